"""Benchmark metrics against worked examples with known answers, the loaders on the embedded
benchmarks (published formats) and on bad input, and the runner's DP split and report."""
from __future__ import annotations

import json
import pickle

import pytest

from megavlm.eval.benchmarks import BENCHMARK_NAMES, BenchmarkError, Sample, get_benchmark
from megavlm.eval.benchmarks.captions import caption_scores, tokenize
from megavlm.eval.benchmarks.multiple_choice import circular_accuracy, extract_choice, rotations
from megavlm.eval.benchmarks.pope import binary_metrics, yes_no
from megavlm.eval.benchmarks.refcoco import iou, parse_box
from megavlm.eval.benchmarks.vqa import normalize_answer, vqa_accuracy


@pytest.fixture(scope="module")
def embedded_benchmarks(small_embedded):
    return small_embedded / "benchmarks"


# ---- VQA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("two dogs.", "2 dogs"), ("the red circle", "red circle"), ("A cat", "cat"),
    ("yes!", "yes"), ("isnt", "isn't"), ("dont know", "don't know"), ("1,000", "1000"), ("3.5", "3.5"),
    ("left-hand side", "left hand side"), ("none", "0"), ("  black\n", "black"), ("it's (red)", "it's red"),
])
def test_vqa_normalisation_follows_the_official_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets():
    # 3 of 10 annotators say "2": each subset without one of them has 2 matches (2/3), the 7
    # others keep all 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.1 * 0 + 0.9 * (1 / 3))
    assert vqa_accuracy("4", answers) == 0.0


# ---- captions ----------------------------------------------------------------------------------
def test_caption_tokenisation_drops_punctuation_and_case():
    assert tokenize("A Red circle, on a white background.") == "a red circle on a white background"


def test_cider_d_and_bleu4_equal_pycocoevalcap_on_a_fixed_set():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = {"1": ["two red circles on a white background", "a white background with two red circles"],
            "2": ["a blue square to the left of a green triangle", "a green triangle right of a blue square"],
            "3": ["one yellow triangle on a black background", "a yellow triangle on black"]}
    cands = {"1": "two red circles on a white background", "2": "a blue square left of a triangle",
             "3": "three green squares"}
    ours = caption_scores(refs, cands)
    gts = {k: v for k, v in refs.items()}
    res = {k: [v] for k, v in cands.items()}
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert ours["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    perfect = caption_scores({"1": ["a b c d e"], "2": ["f g h i j"]}, {"1": "a b c d e", "2": "f g h i j"})
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)


# ---- POPE --------------------------------------------------------------------------------------
def test_pope_answer_rule_and_metrics():
    assert [yes_no(t) for t in ["Yes, there is.", "No.", "There is not a dog.", "yes", "I see no. Yes"]] == \
        ["yes", "no", "no", "yes", "no"]
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp 2, fp 1, tn 1, fn 1
    assert m == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


# ---- multiple choice ---------------------------------------------------------------------------
def test_choice_extraction_by_letter_or_option_text():
    options = ["red", "green", "blue", "yellow"]
    assert [extract_choice(t, options) for t in ["B", "(C) blue", "D.", "A: red", "blue", "The answer is green.",
                                                  "purple", "E"]] == ["B", "C", "D", "A", "C", "B", None, None]


def test_circular_evaluation_counts_a_question_only_if_every_rotation_is_right():
    assert rotations(["a", "b", "c"], 1) == [(["a", "b", "c"], 1), (["b", "c", "a"], 0), (["c", "a", "b"], 2)]
    samples, predictions = [], []
    for q, answers in (("q1", "BAC"), ("q2", "BAB")):      # q2's third rotation is answered wrong
        for k, ((_, truth), said) in enumerate(zip(rotations(["x", "y", "z"], 1), answers)):
            samples.append(Sample(f"{q}@{k}", None, "", "ABC"[truth], {"question": q, "rotation": k}))
            predictions.append(said)
    assert circular_accuracy(samples, predictions) == {"circular_accuracy": 0.5, "vanilla_accuracy": 1.0}


# ---- REC ---------------------------------------------------------------------------------------
def test_iou_and_box_parsing():
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert parse_box("[0.1, 0.2, 0.5, 0.6]", 200, 100) == pytest.approx([20, 20, 100, 60])
    assert parse_box("box: [10, 20, 110, 60].", 200, 100) == [10, 20, 110, 60]
    assert parse_box("somewhere on the left", 200, 100) is None
    bench = get_benchmark("refcoco")
    samples = [Sample("a", None, "", [0, 0, 10, 10], {"width": 10, "height": 10})] * 2
    assert bench.score(samples, [[0, 0, 10, 6], None]) == {"acc@0.5": 0.5, "mean_iou": 0.3, "unparsed": 1.0}


# ---- loaders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vqav2", "coco_captions", "pope", "mmbench", "seedbench", "scienceqa", "refcoco",
                                  "flickr30k_retrieval"])
def test_embedded_benchmarks_load_in_their_published_formats(embedded_benchmarks, name):
    samples = get_benchmark(name).load(embedded_benchmarks / name)
    assert samples and len({s.sample_id for s in samples}) == len(samples)
    first = samples[0]
    assert isinstance(first.image, bytes) or (embedded_benchmarks / name / "images").is_dir()
    if name == "vqav2":
        assert all(len(s.reference) == 10 for s in samples)
    if name == "pope":
        assert {s.meta["split"] for s in samples} == {"random", "popular", "adversarial"}
        assert {s.reference for s in samples} == {"yes", "no"}
    if name == "mmbench":    # every question asked once per rotation of its 4 options
        assert len(samples) == 4 * len({s.meta["question"] for s in samples})


def test_embedded_existence_instructions_read_as_their_labels_under_popes_rule(small_embedded):
    """The training answers to existence questions ("square yellow no") name the asked object and
    are read by POPE's rule as the truth; present and absent objects are balanced."""
    records = json.loads((small_embedded / "existence_train.json").read_text())
    assert len(records) == 2 * 768
    labels = []
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        shape, colour, label = answer.split()
        assert f"Is there a {colour} {shape} in the image?" in question and (small_embedded / r["image"]).is_file()
        assert yes_no(answer) == label
        labels.append(label)
    assert labels.count("yes") == labels.count("no")
    mixed = json.loads((small_embedded / "benchmark_instruct_train.json").read_text())
    assert any(r["conversations"][1]["value"].endswith((" yes", " no")) for r in mixed)


def test_an_embedded_model_that_knows_the_scene_scores_perfectly(embedded_benchmarks):
    """The references are consistent: answering with the truth scores 1 on every metric."""
    for name in ("vqav2", "pope", "mmbench", "seedbench", "scienceqa", "refcoco"):
        bench = get_benchmark(name)
        samples = bench.load(embedded_benchmarks / name)
        if name == "vqav2":
            truth = [max(set(s.reference), key=s.reference.count) for s in samples]
        elif name == "refcoco":
            truth = [s.reference for s in samples]
        else:
            truth = [s.reference for s in samples]
        metrics = bench.score(samples, [bench.extract(t, s) if name not in ("refcoco",) else t
                                        for t, s in zip(truth, samples)])
        headline = {"vqav2": "accuracy", "pope": "f1", "mmbench": "circular_accuracy", "seedbench": "accuracy",
                    "scienceqa": "accuracy", "refcoco": "acc@0.5"}[name]
        assert metrics[headline] == pytest.approx(1.0), name


def test_bad_input_names_the_benchmark_file_and_record(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'vqa3'; known: vqav2"):
        get_benchmark("vqa3")
    (tmp_path / "q_questions.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1}]}))
    (tmp_path / "a_annotations.json").write_text(json.dumps({"annotations": [{"question_id": 1, "answers": []}]}))
    with pytest.raises(BenchmarkError, match=r"vqav2: .*q_questions.json question 0: missing key 'question'"):
        get_benchmark("vqav2").load(tmp_path)
    pope = tmp_path / "pope"
    pope.mkdir()
    for split in ("random", "popular", "adversarial"):
        (pope / f"coco_pope_{split}.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "Is?", "label": "maybe"}\n')
    with pytest.raises(BenchmarkError, match=r"coco_pope_random.json record 0: label must be yes or no"):
        get_benchmark("pope").load(pope)
    with pytest.raises(BenchmarkError, match=r"pope: no \*pope_random.json"):
        get_benchmark("pope").load(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "refs(unc).p").write_bytes(pickle.dumps([{"split": "val", "ann_id": 5, "image_id": 1, "file_name": "a.jpg",
                                                     "sentences": []}]))
    (ref / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(BenchmarkError, match=r"refcoco: .* ref 0: annotation 5 / image 1 is not in instances.json"):
        get_benchmark("refcoco").load(ref)


def test_recipe_benchmark_entries_are_checked():
    from megavlm.config.recipe import BenchmarkConfig
    from megavlm.config.schema import ConfigError

    with pytest.raises(ConfigError, match="unknown benchmark 'mmbenchh'"):
        BenchmarkConfig(name="mmbenchh", path="x")
    with pytest.raises(ConfigError, match="needs a path"):
        BenchmarkConfig(name="pope")
    assert "pope" in BENCHMARK_NAMES


def test_max_samples_keeps_whole_questions_and_missing_files_fail_early(embedded_benchmarks, tmp_path):
    from megavlm.config.recipe import BenchmarkConfig
    from megavlm.eval.benchmark_runner import load_benchmarks

    loaded = load_benchmarks([BenchmarkConfig("mmbench", str(embedded_benchmarks / "mmbench"), 5)])
    assert len(loaded[0].samples) == 20          # 5 questions x 4 rotations
    with pytest.raises(BenchmarkError, match=f"pope: {tmp_path / 'nope'} does not exist"):
        load_benchmarks([BenchmarkConfig("pope", str(tmp_path / "nope"))])
