"""Point 3, params: each bad params.yaml (or stage argument) stops a stage before any work with
exit code 2 and one line on stderr naming the key and what is allowed; no traceback, no file
created. Every stage validates the whole params.yaml first (``load_params``); the cases run
`python stages/train.py <model> <seed>` where the case is about training (or the stage whose
argument is wrong), else the quicker `python stages/split.py` (no torch import), as concurrent
subprocesses."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from reliability_helpers import (TINY, error_line, files_under, merge, stage_cmd, stage_env,
                                 write_params)
from sparsegan.params import (DEFAULT_ROWS, MODEL_SCORES, MODELS, ParamError, check_model,
                              check_row, check_seed, encoder_blocks, parse_params)

# name -> (params.yaml override or raw text, (stage, its arguments...) or None (the split stage),
# expected pieces of the message)
CASES = {
    "typo": ({"train": {"lamda_sp": 50}}, None,
             ["unknown key train.lamda_sp", "allowed keys are", "lambda_sp"]),
    "typo_top_level": ({"trian": {"epochs": 3}}, None,
                       ["unknown key trian", "allowed keys are", "train"]),
    "wrong_type": ({"train": {"epochs": "ten"}}, None,
                   ["train.epochs = 'ten'", "must be of type int"]),
    "wrong_type_float_for_int": ({"train": {"batch_size": 8.5}}, None,
                                 ["train.batch_size = 8.5", "must be of type int"]),
    "section_not_mapping": ({"srn": 3}, None, ["srn must be a mapping"]),
    "negative_lambda": ({"train": {"lambda_sp": -1}}, ("train", "sparse_gan", "0"),
                        ["train.lambda_sp = -1", "must be >= 0"]),
    "beta1_above_1": ({"train": {"beta1": 1.5}}, None, ["train.beta1 = 1.5", "<= 1"]),
    "zero_lr": ({"train": {"lr": 0}}, None, ["train.lr = 0", "must be > 0"]),
    "image_size_too_small": ({"data": {"image_size": 8}}, None,
                             ["data.image_size = 8", "must be >= 16"]),
    "image_size_not_for_encoder": ({"data": {"image_size": 100}}, None,
                                   ["data.image_size = 100", "nearest allowed: 96 or 104"]),
    "unknown_model_in_rows": ({"rows": {"mine": ["sparse_gam", "latent"]}}, None,
                              ["rows.mine: model 'sparse_gam' is not one of", "sparse_gan"]),
    "score_the_model_does_not_give": ({"rows": {"mine": ["anogan", "latent"]}}, None,
                                      ["rows.mine: anogan gives the scores search, not "
                                       "'latent'"]),
    "row_not_a_pair": ({"rows": {"mine": ["sparse_gan"]}}, None,
                       ["rows.mine = ['sparse_gan']: must be [model, score]"]),
    "unknown_model_argument": ({}, ("train", "sparse_gam", "0"),
                               ["unknown model 'sparse_gam'", "allowed", "sparse_gan",
                                "fanogan"]),
    "bad_seed_argument": ({}, ("train", "sparse_gan", "one"),
                          ["seed 'one': must be a whole number"]),
    "missing_seed_argument": ({}, ("train", "sparse_gan"),
                              ["train.py takes <model> <seed>, got 1 argument (sparse_gan)"]),
    "extra_report_argument": ({}, ("report", "x"), ["report.py takes no arguments, got 1"]),
    "negative_seed_argument": ({}, ("train", "sparse_gan", "-1"), ["seed '-1': must be >= 0"]),
    "unknown_row_argument": ({"rows": {"mine": ["pix2pix", "latent"]}},
                             ("calibrate", "sparse_gan"),
                             ["unknown row 'sparse_gan'", "params.yaml's rows are mine"]),
    "no_seeds": ({"seeds": []}, None, ["seeds = []: must be a non-empty list"]),
    "seed_twice": ({"seeds": [0, 1, 0]}, None, ["seeds = [0, 1, 0]: a seed is listed twice"]),
    "negative_seed": ({"seeds": [0, -2]}, None, ["seeds = [0, -2]", "whole numbers >= 0"]),
    "unknown_data_source": ({"data": {"source": "kaggle"}}, None,
                            ["data.source = 'kaggle'", "allowed values are",
                             "synthetic, oct2017, folder"]),
    "unknown_device": ({"runtime": {"device": "gpu"}}, None,
                       ["runtime.device = 'gpu'", "allowed values are auto, cpu, cuda"]),
    "runtime_key_of_the_old_layout": ({"train": {"device": "cpu"}}, None,
                                      ["train.device is now runtime.device", "move it there"]),
    "rows_use_a_model_without_its_section": ({"rows": {"sg": ["sparse_gan", "latent"]}}, None,
                                             ["no srn: section", "model sparse_gan",
                                              "sparsegan/spec.py"]),
    "search_knob_left_in_training": ({"anogan": {"search_steps": 5}}, None,
                                     ["unknown key anogan.search_steps", "latent_dim"]),
    "not_yaml": ("train: {epochs: 3\n  lr: [", None, ["params.yaml: not valid YAML"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case at once; name -> (process result, files before, files after)."""
    procs = {}
    for name, (over, stage_args, _) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        text = over if isinstance(over, str) else yaml.safe_dump(merge(TINY, over))
        write_params(root, text=text)
        before = files_under(root)
        env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        cmd = stage_cmd(*stage_args) if stage_args else stage_cmd("split")
        procs[name] = (subprocess.Popen(cmd, cwd=root, env=env,
                                        text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE), root, before)
    out = {}
    for name, (proc, root, before) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (proc.returncode, stdout, stderr, before, files_under(root))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_param_gives_one_named_line_before_any_work(outcomes, name, ledger):
    ledger.inputs()
    rc, stdout, stderr, before, after = outcomes[name]
    assert rc == 2, (rc, stderr)
    line = error_line(stderr)
    assert len(stderr.strip().splitlines()) == 1, stderr  # nothing else was even started
    for piece in CASES[name][2]:
        assert piece in line, (piece, line)
    assert stdout == ""
    assert after == before, f"files created: {sorted(after - before)}"


def test_encoder_size_rule_matches_the_networks():
    """params.py checks data.image_size with a torch-free copy of networks.num_blocks."""
    from sparsegan.models.networks import num_blocks

    for size in range(16, 1100):
        try:
            blocks = num_blocks(size)
        except ValueError:
            blocks = None
        assert encoder_blocks(size) == blocks, size
        if blocks is None:
            with pytest.raises(ParamError, match="data.image_size"):
                parse_params({"data": {"image_size": size}})


def test_the_repository_params_and_the_paper_setting_are_valid():
    from reliability_helpers import REPO

    parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    parse_params({"data": {"image_size": 224}, "model": {"base_channels": 64}})


def test_val_per_disease_number_or_mapping():
    from sparsegan.params import parse_params
    assert parse_params({"data": {"split": {"val_per_disease": 7}}}).data.split.val_per_disease == 7
    p = parse_params({"data": {"split": {"val_per_disease": {"cnv": 150, "DME": 0}}}})
    assert p.data.split.val_per_disease == {"CNV": 150, "DME": 0}
    with pytest.raises(ParamError, match=r"data.split.val_per_disease.PNEUMONIA: not a disease"):
        parse_params({"data": {"split": {"val_per_disease": {"PNEUMONIA": 3}}}})
    with pytest.raises(ParamError, match=r"data.split.val_per_disease.CNV = -1: must be a whole"):
        parse_params({"data": {"split": {"val_per_disease": {"CNV": -1}}}})
    with pytest.raises(ParamError, match=r"data.split.val_per_disease = 0: must be >= 1"):
        parse_params({"data": {"split": {"val_per_disease": 0}}})
    with pytest.raises(ParamError, match=r"data.split.val_per_disease = 'x'"):
        parse_params({"data": {"split": {"val_per_disease": "x"}}})


@pytest.mark.parametrize("value,match", [
    ([], r"^params.yaml: seeds = \[\]: must be a non-empty list of whole numbers >= 0"),
    ([0, 2, 2], r"^params.yaml: seeds = \[0, 2, 2\]: a seed is listed twice"),
    ([1, -1], r"^params.yaml: seeds = \[1, -1\]: must be a non-empty list of whole numbers >= 0"),
    ([0, 1.5], r"^params.yaml: seeds = \[0, 1.5\]: must be a non-empty"),
    ([True], r"^params.yaml: seeds = \[True\]: must be a non-empty"),  # a bool is no seed
    ("0,1", r"^params.yaml: seeds = '0,1': must be a non-empty"),
    ({"a": 0}, r"^params.yaml: seeds = \{'a': 0\}: must be a non-empty"),
])
def test_seeds_refused_in_process_with_a_param_error_naming_the_key(value, match, ledger):
    ledger.inputs()
    with pytest.raises(ParamError, match=match):
        parse_params({"seeds": value})


def test_seeds_parse_to_a_tuple_in_the_given_order():
    assert parse_params({}).seeds == (0,)
    assert parse_params({"seeds": [2, 0, 1]}).seeds == (2, 0, 1)
    assert parse_params({"seeds": 3}).seeds == (3,)  # `-S seeds=3` gives a bare number


@pytest.mark.parametrize("rows,match", [
    ({"mine": ["sparse_gam", "latent"]},
     r"^params.yaml: rows.mine: model 'sparse_gam' is not one of autoencoder, pix2pix, "
     r"sparse_gan, anogan, fanogan$"),
    ({"ok": ["pix2pix", "image"], "mine": ["fanogan", "image"]},
     r"^params.yaml: rows.mine: fanogan gives the scores izif, not 'image'$"),
    ({"mine": ["autoencoder", "search"]},
     r"^params.yaml: rows.mine: autoencoder gives the scores image, latent, not 'search'$"),
    ({"mine": ["sparse_gan", "latent", "x"]}, r"^params.yaml: rows.mine = .*must be \[model, "),
    ({"mine": "sparse_gan"}, r"^params.yaml: rows.mine = 'sparse_gan': must be \[model, score\]"),
    ({}, r"^params.yaml: rows must be a mapping row -> \[model, score\]"),
    (["sparse_gan"], r"^params.yaml: rows must be a mapping"),
])
def test_rows_refused_in_process_with_a_param_error_naming_the_row(rows, match, ledger):
    ledger.inputs()
    with pytest.raises(ParamError, match=match):
        parse_params({"rows": rows})


def test_rows_parse_to_model_score_pairs_and_default_to_every_row():
    assert parse_params({}).rows == DEFAULT_ROWS
    rows = parse_params({"rows": {"b": ["anogan", "search"], "a": ["pix2pix", "latent"]}}).rows
    assert rows == {"b": ("anogan", "search"), "a": ("pix2pix", "latent")}
    assert list(rows) == ["b", "a"]  # the report keeps params.yaml's order
    for model, score in DEFAULT_ROWS.values():
        assert model in MODELS and score in MODEL_SCORES[model]


def test_stage_arguments_are_checked():
    params = parse_params({"rows": {"mine": ["pix2pix", "latent"]}})
    assert check_row("mine", params) == ("pix2pix", "latent")
    with pytest.raises(ParamError,
                       match=r"^unknown row 'sparse_gan': params.yaml's rows are mine$"):
        check_row("sparse_gan", params)
    for model in MODELS:
        assert check_model(model) == model
    with pytest.raises(ParamError, match=r"^unknown model 'pix2pix_image': allowed autoencoder, "):
        check_model("pix2pix_image")  # a row is not a model
    assert check_seed("7") == 7 and check_seed(0) == 0
    for bad, match in (("-1", "must be >= 0"), ("1.5", "must be a whole number"),
                       ("", "must be a whole number"), (None, "must be a whole number")):
        with pytest.raises(ParamError, match=match):
            check_seed(bad)
