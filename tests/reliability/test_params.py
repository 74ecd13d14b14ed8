"""Point 3, params: each bad params.yaml (or stage argument) stops a stage before any work with
exit code 2 and one line on stderr naming the key and what is allowed; no traceback, no file
created. Every stage validates the whole params.yaml first (``load_params``); the cases run
`python stages/train.py <variant>` where the case is about training, else the quicker
`python stages/split.py` (no torch import), as concurrent subprocesses."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from reliability_helpers import (TINY, error_line, files_under, merge, stage_cmd, stage_env,
                                 write_params)
from sparsegan.params import ParamError, encoder_blocks, parse_params

# name -> (params.yaml override or raw text, train variant argument or None (the split stage),
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
    "negative_lambda": ({"train": {"lambda_sp": -1}}, "sparse_gan",
                        ["train.lambda_sp = -1", "must be >= 0"]),
    "beta1_above_1": ({"train": {"beta1": 1.5}}, None, ["train.beta1 = 1.5", "<= 1"]),
    "zero_lr": ({"train": {"lr": 0}}, None, ["train.lr = 0", "must be > 0"]),
    "image_size_too_small": ({"data": {"image_size": 8}}, None,
                             ["data.image_size = 8", "must be >= 16"]),
    "image_size_not_for_encoder": ({"data": {"image_size": 100}}, None,
                                   ["data.image_size = 100", "nearest allowed: 96 or 104"]),
    "unknown_variant_in_params": ({"variants": {"sparse_gam": ["srn", "srn", "srn"]}},
                                  None,
                                  ["variants.sparse_gam is not a variant", "allowed",
                                   "sparse_gan"]),
    "unknown_variant_argument": ({}, "sparse_gam",
                                 ["unknown variant 'sparse_gam'", "allowed", "sparse_gan",
                                  "fanogan"]),
    "unknown_data_source": ({"data": {"source": "kaggle"}}, None,
                            ["data.source = 'kaggle'", "allowed values are",
                             "synthetic, oct2017, folder"]),
    "unknown_device": ({"train": {"device": "gpu"}}, None,
                       ["train.device = 'gpu'", "allowed values are auto, cpu, cuda"]),
    "variant_reads_unknown_param": ({"variants": {"sparse_gan": ["train.lambda_sp", "srn",
                                                                 "train.lamda"]}},
                                    None, ["variants.sparse_gan names 'train.lamda'"]),
    "not_yaml": ("train: {epochs: 3\n  lr: [", None, ["params.yaml: not valid YAML"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case at once; name -> (process result, files before, files after)."""
    procs = {}
    for name, (over, variant, _) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        text = over if isinstance(over, str) else yaml.safe_dump(merge(TINY, over))
        write_params(root, text=text)
        before = files_under(root)
        env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        cmd = stage_cmd("train", variant) if variant else stage_cmd("split")
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
