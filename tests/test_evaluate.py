import json
from pathlib import Path

import pytest
import torch

from sn_lightning.evaluate import autoattack_accuracy
from sn_lightning.evaluate import main as evaluate_main
from sn_lightning.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    fit_main(
        [
            "--config",
            QUICKSTART,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_epochs=4",
            "--robust_eval.attacks=[]",
        ]
    )
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


def _evaluate(checkpoint, out, *extra):
    report = evaluate_main(
        [
            "--config",
            QUICKSTART,
            f"--ckpt_path={checkpoint}",
            "--eval.eps=[0.005,0.15,0.3]",
            "--eval.steps=10",
            "--eval.max_examples=24",
            f"--eval.out={out}",
            *extra,
        ]
    )
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved == {k: v for k, v in report.items() if k != "out"}
    assert saved["n"] == 24 and saved["clean_acc"] > 0.8
    pgd, aa = saved["pgd"], saved["autoattack"]
    assert list(pgd) == ["0.005", "0.15", "0.3"] and list(aa) == list(pgd)
    assert (
        pgd["0.3"] <= pgd["0.15"] <= pgd["0.005"] <= saved["clean_acc"]
    )  # larger balls never help
    for eps in aa:  # AutoAttack is at least as strong as PGD, up to one example
        assert aa[eps] <= pgd[eps] + 1 / 24 + 1e-9
    assert (out / "robustness_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the quickstart CNN (conv, ReLU, max pooling, linear) has a sound pairwise LipLT certificate;
    # linf radii go through the l2 ball of radius eps * sqrt(d), and a certified point is never
    # broken by the attack
    cert = saved["certified"]
    assert cert["rule"].startswith("pairwise LipLT, sound; linf eps certified through the l2 ball")
    assert list(cert["acc"]) == ["0.005", "0.15", "0.3"]
    assert cert["acc"]["0.005"] > 0.5  # a small ball certifies most points
    for eps, acc in cert["acc"].items():
        assert 0.0 <= acc <= aa[eps] + 1e-9 and acc <= pgd[eps] + 1e-9
    return saved


def test_evaluate_pgd_and_the_autoattack_subset(checkpoint, tmp_path, monkeypatch, capsys):
    """``--eval.autoattack_attacks`` runs only the named attacks (here no FAB-T, no Square)."""
    import pyautoattack.fab_pt
    import pyautoattack.square

    ran: list[str] = []
    for cls, name in (
        (pyautoattack.fab_pt.FABAttack_PT, "fab"),
        (pyautoattack.square.SquareAttack, "square"),
    ):
        monkeypatch.setattr(cls, "perturb", lambda self, x, y, name=name: ran.append(name) or x)
    saved = _evaluate(checkpoint, tmp_path, "--eval.autoattack_attacks=[apgd-t,apgd-ce]")
    assert ran == []
    # named in the standard order, with the standard version's settings
    assert saved["autoattack_settings"] == {
        "version": "standard subset",
        "attacks": ["apgd-ce", "apgd-t"],
        "target_classes": 9,
    }
    captured = capsys.readouterr()  # the console names the subset too
    assert f"AutoAttack[apgd-ce,apgd-t] {saved['autoattack']['0.15']:.4f}" in captured.out
    # progress on stderr as each attack finishes, AutoAttack's own lines with their eps
    err = captured.err.splitlines()
    pgd, aa = saved["pgd"], saved["autoattack"]
    assert f"evaluate: PGD-10 linf eps 0.15: acc {pgd['0.15']:.4f}" in "\n".join(err)
    cert = " ".join(f"eps {e} {a:.4f}," for e, a in saved["certified"]["acc"].items())
    assert f"evaluate: certified acc {cert[:-1]}" in err
    for eps in aa:
        after = [line for line in err if line.startswith(f"evaluate: AutoAttack linf eps {eps}: ")]
        assert any("robust accuracy after APGD-CE" in line for line in after)
        assert after[-1].endswith(f"robust accuracy: {aa[eps]:.2%}")


@pytest.mark.slow
def test_evaluate_pgd_and_autoattack_standard(checkpoint, tmp_path):
    saved = _evaluate(checkpoint, tmp_path)
    assert saved["autoattack_settings"] == {
        "version": "standard",
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
        "target_classes": 9,
    }


@pytest.mark.parametrize("attacks", [[], ["fab"], ["apgd-ce", "square-t"]])
def test_autoattack_accuracy_refuses_names_outside_the_standard_version(attacks):
    """A misspelt name would otherwise leave no attack to run: clean accuracy reported as robust."""
    with pytest.raises(ValueError, match=r"name one or more of apgd-ce, apgd-t, fab-t, square"):
        autoattack_accuracy(
            torch.nn.Flatten(),
            torch.zeros(2, 4),
            torch.zeros(2, dtype=torch.long),
            norm="linf",
            eps=0.1,
            device=torch.device("cpu"),
            batch_size=2,
            attacks=attacks,
        )


def _linear_classifier(classes, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes)).eval()


def test_autoattack_targets_at_most_the_other_classes_of_a_small_model(monkeypatch):
    """pyautoattack's standard 9 target classes index past the logits of a K < 10 class model."""
    import pyautoattack.autopgd_base
    import pyautoattack.fab_base
    import pyautoattack.square

    # Square (5000 queries on each example left) changes nothing here: it leaves them unbroken
    monkeypatch.setattr(pyautoattack.square.SquareAttack, "perturb", lambda self, x, y: x)
    targets = []
    for cls in (pyautoattack.autopgd_base.APGDAttack_targeted, pyautoattack.fab_base.FABAttack):
        real = cls.perturb

        def spy(self, *args, real=real, **kwargs):
            targets.append((type(self).__name__, self.n_target_classes))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "perturb", spy)
    model = _linear_classifier(5)
    x = torch.rand(12, 1, 4, 4)
    y = model(x).argmax(1)  # all correct: every attack gets examples to break
    kwargs = {"norm": "linf", "eps": 0.02, "device": torch.device("cpu"), "batch_size": 12}
    everything = autoattack_accuracy(model, x, y, **kwargs)
    assert targets == [("APGDAttack_targeted", 4), ("FABAttack_PT", 4)]  # K - 1
    apgd_ce = autoattack_accuracy(model, x, y, attacks=["apgd-ce"], **kwargs)
    assert 0.0 <= everything <= apgd_ce <= 1.0
    # three classes: apgd-t's targeted DLR loss needs four logits; the other three run
    three = _linear_classifier(3)
    y3 = three(x).argmax(1)
    with pytest.raises(ValueError, match=r"apgd-t needs at least 4 classes .* the model has 3; "):
        autoattack_accuracy(three, x, y3, **kwargs)
    rest = autoattack_accuracy(three, x, y3, attacks=["apgd-ce", "fab-t", "square"], **kwargs)
    assert 0.0 <= rest <= 1.0 and targets[-1] == ("FABAttack_PT", 2)


def test_autoattack_on_three_classes_is_refused_before_any_work(tmp_path, capsys):
    from tests.data.fixtures import make_image_folder

    make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), size=8)
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not read: the settings are checked first")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            [
                "--config",
                QUICKSTART,
                "--data.dataset=imagefolder",
                f"--data.data_dir={tmp_path / 'imgs'}",
                "--data.image_size=8",
                f"--ckpt_path={fake}",
                "--eval.autoattack_attacks=[apgd-ce,apgd-t]",
                f"--eval.out={tmp_path / 'out'}",
            ]
        )
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        "AutoAttack's apgd-t needs at least 4 classes (its targeted DLR loss), the model has 3; "
        "run without it: --eval.autoattack_attacks=[apgd-ce]"
    )
    assert not (tmp_path / "out").exists()


def test_an_empty_autoattack_subset_is_refused(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            [
                "--config",
                QUICKSTART,
                f"--ckpt_path={checkpoint}",
                "--eval.autoattack_attacks=[]",
                f"--eval.out={tmp_path}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "eval autoattack_attacks is empty; name some of apgd-ce, apgd-t, fab-t, square" in err
    assert not (tmp_path / "evaluation.json").exists()


def test_certified_report_says_why_there_is_no_certificate():
    from types import SimpleNamespace

    import torch
    from torch import nn

    from sn_lightning.evaluate import certified_report

    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)
    ).eval()
    model = SimpleNamespace(hparams=SimpleNamespace(input_shape=(1, 8, 8)), model=net)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    report = certified_report(
        model, x, y, norm="l2", eps_list=[0.1], device=torch.device("cpu"), batch_size=4
    )
    assert set(report) == {"reason"}
    assert report["reason"].startswith("no sound certificate for this backbone: unsupported module")
    assert "BatchNorm2d" in report["reason"]


def test_evaluate_certified_accuracy_on_a_liplt_model(tmp_path, capsys):
    config = str(ROOT / "configs" / "digits_crm.yaml")
    fit_main(
        ["--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2"]
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    report = evaluate_main(
        [
            "--config",
            config,
            f"--ckpt_path={ckpt}",
            "--eval.norm=l2",
            "--eval.eps=[0.1,0.5]",
            "--eval.autoattack=false",
            "--eval.max_examples=100",
            "--eval.progress=false",
            f"--eval.out={tmp_path / 'ev'}",
        ]
    )
    cert, pgd = report["certified"]["acc"], report["pgd"]
    for eps in ("0.1", "0.5"):
        assert cert[eps] <= pgd[eps] + 1e-9  # a certified point is never broken by an attack
    assert cert["0.5"] <= cert["0.1"] and cert["0.1"] > 0.5
    # the console shows what evaluation.json holds, the certificate included; no progress lines
    captured = capsys.readouterr()
    assert "evaluate: " not in captured.err
    out = captured.out.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("clean acc "))
    assert out[i : i + 3] == [
        f"clean acc {report['clean_acc']:.4f} (n=100)",
        f"eps 0.1: PGD-20 {pgd['0.1']:.4f}  certified {cert['0.1']:.4f}",
        f"eps 0.5: PGD-20 {pgd['0.5']:.4f}  certified {cert['0.5']:.4f}",
    ]


def test_evaluate_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--config", QUICKSTART, f"--ckpt_path={tmp_path / 'none.ckpt'}"])
    assert exit_info.value.code == 2
    assert "none.ckpt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval.max_examples=-5"], "eval max_examples must be >= 1 or null (all), got -5"),
        (["--eval.max_examples=0"], "eval max_examples must be >= 1 or null (all), got 0"),
        (["--eval.device=gpu"], "unknown eval device 'gpu'; valid choices: auto, cpu, cuda"),
        (
            ["--model.beta=null"],
            "does not fit the model built from this config (pass the training run's config.yaml): "
            "the checkpoint's model has spectral normalization and this config's has not "
            "(model.beta, model.sn_*); ",
        ),
        (["--model.backbone=sn_lightning:mlp1"], "does not fit the model built from this config"),
        # same weight shapes, another function or other test images: ran, with wrong numbers
        (
            ["--model.beta=1.0", "--model.lr=0.5"],  # lr: training only, not named
            "was trained with other settings: model.beta 2.0 (this config: 1.0); pass the "
            "training run's config.yaml (in its run folder) without overriding these",
        ),
        (
            ["--data.val_source=test", "--data.val_size=50"],
            "was trained with other settings: data.val_source 'train' (this config: 'test'), "
            "data.val_size 0.1 (this config: 50);",
        ),
        (
            ["--eval.norm=l2", "--eval.eps=[0.5, 10]"],
            "eval: l2 eps 10 >= 8, the diameter of the [0, 1] box of (1, 8, 8) inputs, covers "
            "every input",
        ),
        (["--eval.eps=[0.1, 8]"], "linf eps 8 >= 1 covers the whole [0, 1] pixel range"),
        (["--eval.eps=[]"], "eval eps [] names no radius; give radii such as [0.1, 0.25], or null"),
        (
            ["--eval.eps=[0.1, 0.2, 0.1000001]"],
            "eval eps [0.1, 0.2, 0.1000001] gives radius 0.1 more than once",
        ),
        (["--eval.eps=[0.1, .inf]"], "eval eps must all be finite and > 0, got [0.1, inf]"),
    ],
)
def test_evaluate_bad_input_is_one_line(checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            ["--config", QUICKSTART, f"--ckpt_path={checkpoint}", f"--eval.out={tmp_path}", *extra]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "evaluation.json").exists()


def test_evaluate_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.fc.weight": torch.zeros(3, 3)}}, other)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--config", QUICKSTART, f"--ckpt_path={other}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"checkpoint {other} does not fit the model built from this config" in err


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("# not a checkpoint\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--config", QUICKSTART, f"--ckpt_path={bogus}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bogus} is not a checkpoint torch.load can read" in err


def test_help_describes_every_eval_key(capsys):
    """Each ``--eval.*`` key says what it does (norm, batch_size and out said nothing) and the
    radii's help names the real defaults rather than only "null"."""
    import re

    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    described = dict(
        re.findall(r"--eval\.(\w+) [A-Z_]+(?:, --eval\.\w+\+ [A-Z_]+)? (.*?)\(type:", text)
    )
    described.update(re.findall(r"--eval\.(\w+) \{[\w,]+\} (.*?)\(type:", text))
    keys = {"norm", "eps", "steps", "restarts", "autoattack", "autoattack_attacks"}
    keys |= {"max_examples", "batch_size", "device", "out", "progress"}
    assert set(described) == keys
    assert all(help_text.strip() for help_text in described.values()), described
    assert (
        "null: the norm's defaults (linf: 2/255, 4/255, 8/255, 16/255; l2: 0.25, 0.5, 1, 2)" in text
    )
