"""air_ft: AIR low-rank compression of Hugging Face causal LMs, then LoRA recovery fine-tuning.

Public API::

    model, tok = air_ft.load_model(name_or_path, gguf_file=None, dtype=torch.float32)
    result = air_ft.compress(model, tok, texts, method="air", retention=0.6, num_samples=64, seq_len=512, seed=0)
    air_ft.save_compressed(model, tok, out_dir)
    model, tok = air_ft.load_compressed(out_dir)
    ppl = air_ft.perplexity(model, tok, text, seq_len=2048)
    model, summary = air_ft.finetune(model, tok, texts, max_steps=100, lora_rank=8, learning_rate=2e-4,
                                     seq_len=512, return_summary=True)
    scores = air_ft.evaluate_tasks(model, tok, tasks=["piqa", "arc_easy"], limit=200, batch_size=16, seed=0)
    eff = air_ft.efficiency(model, tok)
    fit = air_ft.acip_fit(model, tok, texts, stop_retention=0.4)   # ACIP-style baseline; model left unchanged
    small = fit.materialize(retention=0.6)
"""

from air_ft.acip import AcipFit, acip_fit
from air_ft.checkpoint import export_dense, load_compressed, save_compressed
from air_ft.compress import compress
from air_ft.efficiency import efficiency
from air_ft.evaluate import evaluate_perplexity, perplexity
from air_ft.modeling import LowRankLinear, load_model, prepare_model
from air_ft.reasoning import evaluate_tasks

__version__ = "0.1.0"

__all__ = ["load_model", "compress", "save_compressed", "load_compressed", "export_dense", "perplexity",
           "evaluate_perplexity", "evaluate_tasks", "efficiency", "prepare_model", "LowRankLinear", "finetune",
           "acip_fit", "AcipFit",
           "__version__"]


def finetune(*args, **kwargs):
    """LoRA recovery fine-tuning; see :func:`air_ft.train.finetune`."""
    from air_ft.train import finetune as _finetune

    return _finetune(*args, **kwargs)
