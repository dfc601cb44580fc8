import copy
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml

pytest.importorskip("sweeps", reason='the sweeps extra: pip install "sn-lightning[sweeps]"')

from sn_lightning import sweep
from sn_lightning.fit import main as fit_main
from tests.wandb_helpers import isolate_wandb, offline_run, wandb_run_config, wandb_summary

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
DIGITS = ROOT / "sweeps" / "digits_beta_eps_grid.yaml"
BAYES = ROOT / "sweeps" / "cifar10_pgd_beta_bayes.yaml"
BETAS = {1.0, 1.3, 1.6, 2.0, 4.0, None}
# A few steps per run: with them the digits sweep takes seconds per run.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--robust_eval.final_max_examples=32",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.chdir(ROOT)  # the sweeps' commands name configs/ relative to the repository


def _names(paths):
    return [p.name for p in paths]


def _proposal(path, pick_null_beta=True):
    """A run the engine proposes; one with beta null (no SN) where the sweep has it."""
    cfg = sweep.load_sweep(path)
    proposals = sweep.propose(sweep.sweep_config(cfg), [], n=100)
    nulls = [p for p in proposals if "model.beta" in p and p["model.beta"] is None]
    return cfg, (nulls[0] if nulls and pick_null_beta else proposals[0])


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _contains(actual, expected):
    """``expected`` appears in ``actual`` (dicts: a subset; floats: approximately)."""
    if isinstance(expected, dict):
        return all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(_contains, actual, expected))
    if isinstance(expected, float):
        return actual == pytest.approx(expected)
    return actual == expected


# -- the sweep files ------------------------------------------------------------------------------
def test_the_sweep_set_covers_the_issue():
    cfgs = {p.name: sweep.load_sweep(p) for p in SWEEPS}
    grids = {n: c for n, c in cfgs.items() if n.startswith(("fgm_", "pgd_", "wrm_"))}
    assert len(grids) == 3
    for name, cfg in grids.items():
        assert cfg["method"] == "grid"
        assert set(cfg["parameters"]["model.beta"]["values"]) == BETAS, name
        radius = [k for k in cfg["parameters"] if k.startswith("adversarial.attack.init_args.")]
        assert len(radius) == 1 and len(cfg["parameters"][radius[0]]["values"]) >= 3, name
    assert "gamma_rel" in next(
        k for k in grids["wrm_beta_gamma_grid.yaml"]["parameters"] if "gamma" in k
    )
    bayes = cfgs["cifar10_pgd_beta_bayes.yaml"]
    assert bayes["method"] == "bayes" and bayes["early_terminate"]["type"] == "hyperband"
    crm = cfgs["cifar10_crm_grid.yaml"]["parameters"]
    assert {"model.crm_lambda", "model.crm_r0"} <= set(crm)
    digits = cfgs["digits_beta_eps_grid.yaml"]
    assert "configs/quickstart.yaml" in digits["command"]
    assert digits["parameters"]["trainer.max_epochs"]["value"] <= 3
    for name, cfg in cfgs.items():
        assert cfg["metric"]["goal"] == "maximize", name
        assert cfg["metric"]["name"].startswith(("val/robust_acc/", "val/certified_acc/")), name
        assert cfg["command"][2:4] == ["-m", "sn_lightning.fit"], name
        assert cfg["command"][-2:] == ["--config", "${args_json_file}"], name


SUMMARIES = {
    "digits_beta_eps_grid.yaml": "grid, 6 runs, maximize val/robust_acc/pgd20_linf_0.1",
    "fgm_beta_eps_grid.yaml": "grid, 24 runs, maximize val/robust_acc/pgd20_linf_0.1",
    "cifar10_pgd_beta_bayes.yaml": (
        "bayes, unbounded, maximize val/robust_acc/pgd20_linf_0.0313725, hyperband"
    ),
}


@pytest.mark.parametrize("path", SWEEPS, ids=_names(SWEEPS))
def test_every_sweep_validates(capsys, path):
    """Schema, engine, parse and constructor checks all pass; one summary line on stdout."""
    assert sweep.main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    line, *notes = captured.out.splitlines()
    assert line.startswith(f"{path}: ok (") and line.endswith(")")
    # a machine without the Fashion-MNIST package (apt dataset-fashion-mnist) adds a data note
    assert all(n.startswith(f"{path}: note: the data is not on this machine") for n in notes)
    if path.name in SUMMARIES:
        assert line == f"{path}: ok ({SUMMARIES[path.name]})"


# -- the command `wandb agent` starts ---------------------------------------------------------------
def _wandb_agent_argv(monkeypatch, cfg, params, run_id, wandb_dir):
    """What wandb's own Agent._command_run starts (its process creation intercepted)."""
    from wandb import wandb_agent

    started = {}

    class _Captured:
        def __init__(self, command=None, env=None, **kwargs):
            started["command"], started["env"] = command, env

    monkeypatch.setattr(wandb_agent, "AgentProcess", _Captured)
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them; undone after
        monkeypatch.setenv(name, "unset")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="abc123")
    agent._sweep_command = copy.deepcopy(cfg["command"])  # as read from the sweep's config
    args = {k: {"value": v} for k, v in params.items()}
    agent._command_run({"type": "run", "run_id": run_id, "program": cfg["program"], "args": args})
    return started


@pytest.mark.parametrize("path", SWEEPS, ids=_names(SWEEPS))
def test_agent_command_is_what_wandb_agent_starts(monkeypatch, tmp_path, path):
    cfg, params = _proposal(path)
    started = _wandb_agent_argv(monkeypatch, cfg, params, "run0001", tmp_path)
    json_file = tmp_path / "wandb" / "sweep-abc123" / "config-run0001.json"
    written_by_agent = json.loads(json_file.read_text())
    json_file.unlink()
    ours = sweep.agent_command(cfg, params, run_id="run0001", sweep_id="abc123", wandb_dir=tmp_path)
    assert ours == started["command"]
    assert json.loads(json_file.read_text()) == written_by_agent == params
    assert ours[:4] == ["/usr/bin/env", "python", "-m", "sn_lightning.fit"]
    assert ours[-2:] == ["--config", str(json_file)]


def test_args_macro_renders_like_the_agent(monkeypatch, tmp_path):
    cfg = sweep.load_sweep(DIGITS)
    cfg["command"] = [*cfg["command"][:-2], "${args}"]
    params = {"model.beta": 1.5, "adversarial.attack.init_args.eps": 0.1, "model.sn_detach": False}
    started = _wandb_agent_argv(monkeypatch, cfg, params, "run0002", tmp_path)
    ours = sweep.agent_command(cfg, params, run_id="run0002", sweep_id="abc123", wandb_dir=tmp_path)
    assert ours == started["command"]
    assert ours[-3:] == [
        "--model.beta=1.5",
        "--adversarial.attack.init_args.eps=0.1",
        "--model.sn_detach=False",
    ]


def _print_config(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", SWEEPS, ids=_names(SWEEPS))
def test_a_proposed_run_reaches_the_model(tmp_path, capsys, path):
    cfg, params = _proposal(path)
    argv = sweep.agent_command(cfg, params, run_id="run0003", sweep_id="s", wandb_dir=tmp_path)
    printed = _print_config(sweep.fit_args(argv), capsys)
    for key, value in params.items():
        assert _contains(_lookup(printed, key), value), (key, value, _lookup(printed, key))
    if any(v is None for v in cfg["parameters"].get("model.beta", {}).get("values", [0])):
        assert params["model.beta"] is None and printed["model"]["beta"] is None  # no SN
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"


def test_each_beta_of_a_grid_reaches_the_model(tmp_path, capsys):
    path = ROOT / "sweeps" / "pgd_beta_eps_grid.yaml"
    cfg = sweep.load_sweep(path)
    proposals = sweep.propose(sweep.sweep_config(cfg), [], n=100)
    assert len(proposals) == 24
    seen = set()
    for i, params in enumerate(
        p for p in proposals if p["adversarial.attack.init_args.eps_rel"] == 0.05
    ):
        argv = sweep.agent_command(cfg, params, run_id=f"r{i}", sweep_id="s", wandb_dir=tmp_path)
        printed = _print_config(sweep.fit_args(argv), capsys)
        seen.add(printed["model"]["beta"])
        assert printed["adversarial"]["attack"]["init_args"]["eps_rel"] == 0.05
        assert printed["adversarial"]["attack"]["class_path"] == "sn_lightning.attacks.PGD"
    assert seen == BETAS


def test_the_exact_agent_command_in_a_real_process(tmp_path):
    cfg, params = _proposal(DIGITS)
    argv = sweep.agent_command(cfg, params, run_id="run0004", sweep_id="s", wandb_dir=tmp_path)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    proc = subprocess.run(
        [*argv, "--print_config"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["beta"] is None and params["model.beta"] is None
    eps = printed["adversarial"]["attack"]["init_args"]["eps"]
    assert eps == params["adversarial.attack.init_args.eps"]
    assert printed["trainer"]["max_epochs"] == 3 and printed["robust_eval"]["every_n_epochs"] == 1


# -- bad sweeps: one line each, exit 2 ----------------------------------------------------------------
def _digits_variant(edit):
    cfg = sweep.load_sweep(DIGITS)
    edit(cfg)
    return cfg


def _rename(cfg, old, new):
    cfg["parameters"][new] = cfg["parameters"].pop(old)


def _param(name, spec, method=None):
    def edit(cfg):
        cfg["parameters"][name] = spec
        if method:
            cfg["method"] = method

    return edit


ENGINE = {
    "grid_over_a_range": (
        _param("model.lr", {"distribution": "uniform", "min": 0.01, "max": 0.1}),
        [
            "parameters.model.lr: method grid cannot enumerate distribution uniform; grid takes "
            "values: [...] or value: x (or distribution int_uniform / q_uniform with min and max); "
            "use method random or bayes for a continuous range"
        ],
    ),
    "grid_with_probabilities": (
        _param("model.beta", {"values": [1.0, 2.0], "probabilities": [0.5, 0.5]}),
        ["parameters.model.beta: method grid cannot enumerate values with probabilities;"],
    ),
    "bayes_without_metric": (
        lambda c: (c.update(method="bayes"), c.pop("metric")),
        [
            "metric: method bayes needs a metric: add "
            "`metric: {name: <logged metric>, goal: maximize or minimize}`"
        ],
    ),
    "bayes_without_a_range": (
        lambda c: (
            c.update(method="bayes"),
            c.update(parameters={"model.beta": {"value": 1.0}}),
        ),
        ["parameters: method bayes needs at least one parameter with values or a distribution"],
    ),
    "hyperband_without_metric": (
        lambda c: (
            c.update(early_terminate={"type": "hyperband", "min_iter": 3}),
            c.pop("metric"),
        ),
        ["early_terminate: early termination needs a metric: add `metric: {name: "],
    ),
    "log_range_from_zero": (
        _param("model.lr", {"distribution": "log_uniform_values", "min": 0, "max": 0.1}, "random"),
        ["parameters.model.lr: min must be > 0.0, got 0 (distribution log_uniform_values)"],
    ),
    "min_above_max": (  # the engine says it twice
        _param("model.lr", {"distribution": "uniform", "min": 0.1, "max": 0.01}, "random"),
        ["parameters.model.lr: min 0.1 is not less than max 0.01"],
    ),
    "empty_values": (
        _param("model.beta", {"values": []}),
        ["parameters.model.beta: values must have at least 1 item(s), got []"],
    ),
}
REJECTED = {
    "negative_beta": (
        _param("model.beta", {"values": [-1.0, 2.0]}),
        [
            "parameters.model.beta: value -1.0 is rejected before training: "
            "beta must be positive or null (no spectral normalization), got -1.0"
        ],
    ),
    "negative_beta_range": (
        _param("model.beta", {"distribution": "uniform", "min": -1, "max": 2}, "random"),
        ["parameters.model.beta: min -1 is rejected before training: beta must be positive"],
    ),
    "zero_attack_steps": (
        _param("adversarial.attack.init_args.steps", {"values": [0, 5]}),
        [
            "parameters.adversarial.attack.init_args.steps: value 0 is rejected before training: "
            "steps must be >= 1, got 0"
        ],
    ),
    "zero_eval_interval": (
        _param("robust_eval.every_n_epochs", {"value": 0}),
        [
            "parameters.robust_eval.every_n_epochs: value 0 is rejected before training: "
            "robust_eval every_n_epochs must be >= 1, got 0"
        ],
    ),
    "bad_data_value": (
        _param("data.val_size", {"values": [0.1, 1.5]}),
        ["parameters.data.val_size: value 1.5 is rejected before training: val_size must be"],
    ),
}

BAD = {
    "unknown_key": (
        lambda c: _rename(c, "model.beta", "model.betaa"),
        [
            "parameters.model.betaa: unknown config key",
            "did you mean model.beta?",
            "keys under 'model'",
        ],
    ),
    "unknown_attack_key": (
        lambda c: _rename(
            c, "adversarial.attack.init_args.eps", "adversarial.attack.init_args.epss"
        ),
        ["adversarial.attack.init_args.epss: unknown config key", "eps_rel", "steps"],
    ),
    "bad_value": (
        lambda c: c["parameters"]["adversarial.attack.init_args.eps"].update(values=[0.05, "abc"]),
        [
            "parameters.adversarial.attack.init_args.eps: value 'abc' does not parse: expected float or null"
        ],
    ),
    "bad_choice": (
        lambda c: c["parameters"].update({"model.optimizer": {"values": ["adam", "rmsprop"]}}),
        ["parameters.model.optimizer: value 'rmsprop'", "valid choices: 'sgd', 'adam', 'adamw'"],
    ),
    "bad_method": (
        lambda c: c.update(method="grdi"),
        ["method: 'grdi' is not one of ['bayes', 'random', 'grid', 'custom']"],
    ),
    "bad_field": (
        lambda c: c["parameters"].update({"model.beta": {"valuess": [1.0]}}),
        ["parameters.model.beta: unknown field(s) valuess; valid: value, values"],
    ),
    "metric_not_logged": (
        lambda c: c["metric"].update(name="val/robust_acc/pgd20_linf_0.2"),
        [
            "metric.name: 'val/robust_acc/pgd20_linf_0.2' is not logged",
            "val/robust_acc/pgd20_linf_0.1",
        ],
    ),
    "nested_parameters": (  # W&B's nested form; its engine's message named method random
        lambda c: c.update(parameters={"model": {"parameters": {"beta": {"values": [1.0, 2.0]}}}}),
        [
            "parameters.model: nested parameters are not supported; write dotted keys such as "
            "parameters.model.beta"
        ],
    ),
    "metric_without_validation": (  # val_size 0: no validation split, no val/* metric
        lambda c: c["parameters"].update({"data.val_size": {"value": 0}}),
        ["metric.name: 'val/robust_acc/pgd20_linf_0.1' is not logged", "it logs: epoch, "],
    ),
    "clean_accuracy_under_adversarial_training": (  # every batch is perturbed: train/adv_acc
        lambda c: c["metric"].update(name="train/acc"),
        ["metric.name: 'train/acc' is not logged", "train/adv_acc"],
    ),
    "null_under_args": (
        lambda c: c.update(command=[*c["command"][:-2], "${args}"]),
        ["parameters.model.beta: null renders as `--model.beta=None`", "${args_json_file}"],
    ),
    "not_the_fit_cli": (
        lambda c: c.update(command=["${env}", "${interpreter}", "train.py", "${args}"]),
        ["command must run `python -m sn_lightning.fit`"],
    ),
    "base_config_missing": (
        lambda c: c.update(command=[t.replace("quickstart", "quickstrat") for t in c["command"]]),
        ["command: `python -m sn_lightning.fit --config configs/quickstrat.yaml", "does not parse"],
    ),
    # what the W&B sweeps engine raises only when asked for runs (it used to be a traceback)
    **ENGINE,
    # values that parse but that every run would reject before training
    **REJECTED,
    "base_rejected": (  # the base command fails whatever the values: not blamed on model.beta
        lambda c: c.update(command=[*c["command"][:6], "--model.lr=-0.1", *c["command"][6:]]),
        [
            "run {'adversarial.attack.init_args.eps': 0.05, 'model.beta': 1.0, ",
            "is rejected before training: lr must be positive, got -0.1",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_sweep_is_one_line(tmp_path, capsys, case):
    edit, messages = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(_digits_variant(edit)))
    assert sweep.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"python -m sn_lightning.sweep: error: {path}: ")
    for message in messages:
        assert message in err[0], (message, err[0])


@pytest.mark.parametrize("case", sorted({**ENGINE, **REJECTED}))
def test_run_refuses_a_bad_sweep_before_anything_starts(monkeypatch, tmp_path, capsys, case):
    """`run` (and `run --dry-run`) print the same one line as `validate`, start and write nothing."""
    edit, messages = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(_digits_variant(edit)))
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    for dry_run in ([], ["--dry-run"]):
        out = tmp_path / "out"
        assert sweep.main(["run", str(path), "--count", "2", "--out", str(out), *dry_run]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"python -m sn_lightning.sweep: error: {path}: ")
        assert all(message in line for message in messages), line
        assert captured.out == "" and fake.calls == [] and not out.exists()


def test_a_file_that_is_not_a_sweep(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("- just\n- a list\n")
    assert sweep.main(["validate", str(path), str(DIGITS)]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip()
        == f"python -m sn_lightning.sweep: error: {path}: a sweep config must be a mapping, got list"
    )
    assert "digits_beta_eps_grid.yaml: ok" in captured.out  # the others are still checked


def test_without_the_sweeps_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sweeps", None)  # import sweeps -> ImportError
    assert sweep.main(["validate", str(DIGITS)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith('pip install "sn-lightning[sweeps]"')


# -- the local runner, with a stand-in for the training process ------------------------------------
def _fake_metric(params):
    beta = params.get("model.beta")
    return 0.5 if beta is None else round(1.0 / (1.0 + abs(beta - 2.0)), 6)


class _FakeFit:
    """Stands in for the training process: reads the agent's JSON, writes results.json."""

    def __init__(self, metric, returncode=0, log="fake\n"):
        self.metric, self.returncode, self.log, self.calls = metric, returncode, log, []

    def __call__(self, argv, env, log):
        self.calls.append((list(argv), dict(env)))
        args = sweep.fit_args(argv)
        json_file = [a for a in args if a.endswith(".json")][-1]
        params = json.loads(Path(json_file).read_text())
        root = Path(
            next(a for a in reversed(args) if a.startswith("--trainer.default_root_dir=")).split(
                "=", 1
            )[1]
        )
        run_dir = root / "sn-lightning" / env["WANDB_RUN_ID"]
        run_dir.mkdir(parents=True)
        value = _fake_metric(params)
        results = {"metrics": {self.metric: value}, "test": {"acc": value / 2}, "gap": 0.01}
        if self.returncode == 0:
            (run_dir / "results.json").write_text(json.dumps(results))
        log.write_text(self.log)
        return self.returncode


def test_grid_runs_write_csv_and_plots_and_resume(monkeypatch, tmp_path, capsys):
    cfg = sweep.load_sweep(DIGITS)
    metric = cfg["metric"]["name"]
    fake = _FakeFit(metric)
    monkeypatch.setattr(sweep, "_execute", fake)
    out = tmp_path / "out"
    assert (
        sweep.main(
            ["run", str(DIGITS), "--count", "4", "--out", str(out), "--", "--trainer.max_epochs=1"]
        )
        == 0
    )
    assert len(fake.calls) == 4
    for argv, env in fake.calls:
        run_id = env["WANDB_RUN_ID"]
        assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(out)
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
        assert argv[-2:] == [f"--trainer.default_root_dir={out / run_id}", "--trainer.max_epochs=1"]
        swept = yaml.safe_load(Path(env["WANDB_SWEEP_PARAM_PATH"]).read_text())
        swept = {k: v["value"] for k, v in swept.items() if k != "wandb_version"}
        # W&B's config gets the values the run used (the option after -- won)
        assert {**json.loads(Path(argv[-3]).read_text()), "trainer.max_epochs": 1} == swept
    assert capsys.readouterr().out.startswith(
        "note: the options after -- set trainer.max_epochs; runs.csv and the plots record the "
        "values the runs used\n"
    )
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["status"] for r in rows] == ["finished"] * 4
    expected = sweep.propose(sweep.sweep_config(cfg), [], n=4)
    for row, params in zip(rows, expected, strict=True):
        assert json.loads(row["params_json"]) == params  # the engine's proposal (for resuming)
        assert params["trainer.max_epochs"] == 3
        assert row["trainer.max_epochs"] == "1"  # what the run used: the option after -- won
        assert json.loads(row["used_json"]) == {**params, "trainer.max_epochs": 1}
        assert row["model.beta"] == (
            "null" if params["model.beta"] is None else str(params["model.beta"])
        )
        assert float(row[metric]) == pytest.approx(_fake_metric(params))
        assert float(row["test_acc"]) == pytest.approx(_fake_metric(params) / 2)
    for name in ("metric_vs_model.beta.png", "metric_vs_adversarial.attack.init_args.eps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation resumes: the grid's last 2 points, then it is complete
    assert sweep.main(["run", str(DIGITS), "--out", str(out)]) == 0
    assert len(fake.calls) == 6
    rows = list(csv.DictReader((out / "runs.csv").open()))
    all_points = sweep.propose(sweep.sweep_config(cfg), [], n=100)
    assert sorted(r["params_json"] for r in rows) == sorted(json.dumps(p) for p in all_points)
    assert [r["trainer.max_epochs"] for r in rows] == ["1"] * 4 + ["3"] * 2  # kept on resume
    assert "resuming: 4 earlier runs" in capsys.readouterr().out
    assert sweep.main(["run", str(DIGITS), "--out", str(out)]) == 0
    assert len(fake.calls) == 6 and "the grid is complete" in capsys.readouterr().out


def test_bayes_gets_the_finished_runs_metrics(monkeypatch, tmp_path, capsys):
    cfg = sweep.load_sweep(BAYES)
    metric = cfg["metric"]["name"]
    monkeypatch.setattr(sweep, "_execute", _FakeFit(metric))
    seen = []
    engine = sweep._sweeps()
    real_next_runs = engine.next_runs

    def spy(config, runs, *args, **kwargs):
        if config["method"] == "bayes":
            seen.append([(r.state, dict(r.summary_metrics), r.config) for r in runs])
        return real_next_runs(config, runs, *args, **kwargs)

    monkeypatch.setattr(engine, "next_runs", spy)
    runs = sweep.run_sweep(BAYES, count=3, out=tmp_path / "bayes")
    assert [len(s) for s in seen] == [0, 0, 1, 2]  # validate asks for one run; then one per run
    for i, run in enumerate(runs[:2]):
        state, summary, config = seen[3][i]
        assert state == "finished" and config == {k: {"value": v} for k, v in run.params.items()}
        assert summary == {metric: pytest.approx(_fake_metric(run.params))}
    assert all(0.8 <= r.params["model.beta"] <= 8.0 for r in runs)
    printed = capsys.readouterr().out
    assert "hyperband) is applied by the W&B server only" in printed
    best = max(runs, key=lambda r: r.metric)  # the sweep maximizes its metric
    (line,) = [x for x in printed.splitlines() if x.startswith("best ")]
    assert line.startswith(f"best (maximize {metric}): {best.run_id}: adversarial.attack")
    assert f"-> {metric} = {best.metric:.4f}" in line


def test_best_run_follows_the_goal_and_skips_runs_without_a_metric():
    runs = [
        sweep.LocalRun("a", {}, status="finished", metric=0.5),
        sweep.LocalRun("b", {}, status="failed", metric=0.9),  # failed: not a candidate
        sweep.LocalRun("c", {}, status="finished", metric=None),
        sweep.LocalRun("d", {}, status="finished", metric=0.7),
        sweep.LocalRun("e", {}, status="finished", metric=0.7),
        sweep.LocalRun("f", {}, status="finished", metric=0.2),
    ]
    assert sweep.best_run(runs, "maximize").run_id == "d"  # the first of a tie
    assert sweep.best_run(runs, "minimize").run_id == "f"
    assert sweep.best_run(runs).run_id == "f"  # W&B's default goal
    assert sweep.best_run(runs[1:3], "maximize") is None


def test_count_is_required_for_bayes_and_failed_runs_exit_1(monkeypatch, tmp_path, capsys):
    assert sweep.main(["run", str(BAYES), "--out", str(tmp_path)]) == 2
    assert "--count is required for method bayes" in capsys.readouterr().err
    log = (
        'Seed set to 0\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "RuntimeError: CUDA out of memory at step 3\n\nwandb: Synced 1 run\n"
    )
    monkeypatch.setattr(sweep, "_execute", _FakeFit("x", returncode=1, log=log))
    out = tmp_path / "f"
    assert sweep.main(["run", str(DIGITS), "--count", "1", "--out", str(out)]) == 1
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["status"] for r in rows] == ["failed"]
    assert rows[0]["error"] == "RuntimeError: CUDA out of memory at step 3"
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[1] ")]
    run_id = rows[0]["run_id"]
    assert line.startswith(f"[1] {run_id} failed (0 s): adversarial.attack.init_args.eps=0.05 ")
    assert line.endswith(
        "-> val/robust_acc/pgd20_linf_0.1 = n/a; RuntimeError: CUDA out of memory at step 3 "
        f"({out / run_id / 'output.log'})"
    )
    # resumed, the reason stays in runs.csv
    assert sweep.read_csv(out / "runs.csv", "x")[0].error == rows[0]["error"]


def test_last_error_line(tmp_path):
    log = tmp_path / "output.log"
    assert sweep.last_error_line(log) == ""  # no log
    log.write_text("")
    assert sweep.last_error_line(log) == ""
    log.write_text("Epoch 0\npython -m sn_lightning.fit: error: beta must be positive\nbye\n")
    assert sweep.last_error_line(log) == "python -m sn_lightning.fit: error: beta must be positive"
    log.write_text("ValueError: first\nsn_lightning.errors.ConfigError: second\nwandb: done\n")
    assert sweep.last_error_line(log) == "sn_lightning.errors.ConfigError: second"
    log.write_text("all fine\nthen nothing\n")
    assert sweep.last_error_line(log) == "then nothing"


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_prints_the_agent_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    runs = sweep.run_sweep(
        DIGITS, count=2, out=out, dry_run=True, fit_overrides=["--trainer.max_epochs=1"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert [r.status for r in runs] == ["dry-run"] * 2
    assert not out.exists() and _files(tmp_path) == []  # no folder, JSON file, runs.csv or plot
    assert lines[0].startswith("note: the options after -- set trainer.max_epochs;")
    for run, line in zip(runs, lines[1:], strict=True):
        assert shlex.split(line) == run.command
        # the swept values inline, where a real run gets the agent's JSON file
        assert line.startswith(
            "/usr/bin/env python -m sn_lightning.fit --config configs/quickstart.yaml "
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger --config "
            + shlex.quote(json.dumps(run.params))
        )
        assert line.endswith(
            f"--trainer.default_root_dir={out / run.run_id} --trainer.max_epochs=1"
        )
        assert run.used == {**run.params, "trainer.max_epochs": 1}


def test_a_dry_run_command_runs_as_printed(tmp_path, capsys):
    (run,) = sweep.run_sweep(DIGITS, count=1, out=tmp_path / "out", dry_run=True)
    assert run.params["model.beta"] == 1.0
    capsys.readouterr()
    printed = _print_config(sweep.fit_args(run.command), capsys)
    assert printed["model"]["beta"] == 1.0 and printed["trainer"]["max_epochs"] == 3
    assert (
        printed["adversarial"]["attack"]["init_args"]["eps"]
        == run.params["adversarial.attack.init_args.eps"]
    )


def test_options_after_dashdash_win_over_swept_values(monkeypatch, tmp_path, capsys):
    cfg = sweep.load_sweep(DIGITS)
    fake = _FakeFit(cfg["metric"]["name"])
    monkeypatch.setattr(sweep, "_execute", fake)
    out = tmp_path / "out"
    args = ["run", str(DIGITS), "--count", "3", "--out", str(out), "--", "--model.beta=3"]
    assert sweep.main(args) == 0
    stdout = capsys.readouterr().out
    assert "note: the options after -- set model.beta; runs.csv and the plots" in stdout
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["model.beta"] for r in rows] == ["3.0"] * 3
    assert [json.loads(r["params_json"])["model.beta"] for r in rows] == [1.0, 2.0, None]
    assert all(" model.beta=3 " in line for line in stdout.splitlines() if line.startswith("["))
    for _, env in fake.calls:  # W&B's config too: the metric is credited to the beta used
        swept = yaml.safe_load(Path(env["WANDB_SWEEP_PARAM_PATH"]).read_text())
        assert swept["model.beta"]["value"] == 3.0


def test_options_after_dashdash_that_stop_the_metric_being_logged_fail_before_any_run(
    monkeypatch, tmp_path, capsys
):
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    out = tmp_path / "out"
    option = "--robust_eval.every_n_epochs=5"  # the grid trains 3 epochs
    assert sweep.main(["run", str(DIGITS), "--out", str(out), "--", option]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"python -m sn_lightning.sweep: error: {DIGITS}: with the options after -- (`{option}`), "
        "run {'adversarial.attack.init_args.eps': 0.05, 'model.beta': 1.0, "
        "'robust_eval.every_n_epochs': 1, 'trainer.max_epochs': 3} does not log metric.name "
        "'val/robust_acc/pgd20_linf_0.1'; it logs: epoch, train/loss, final/*, train/adv_acc, "
        "val/loss, val/acc, sn/*"
    ), line
    assert fake.calls == [] and not out.exists()


def test_validate_refuses_a_robust_metric_that_no_epoch_evaluates(tmp_path):
    cfg = sweep.load_sweep(DIGITS)
    cfg["parameters"]["robust_eval.every_n_epochs"] = {"value": 5}  # 3 epochs: never
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump(cfg))
    errors = sweep.validate_sweep(path)
    assert errors and all(
        "metric.name: 'val/robust_acc/pgd20_linf_0.1' is not logged by run" in e for e in errors
    ), errors


@pytest.mark.parametrize(
    ("max_epochs", "check_val", "every", "logged"),
    [(3, 1, 5, False), (5, 1, 5, True), (5, 2, 3, False), (6, 2, 3, True), (-1, 1, 5, True)],
)
def test_robust_metrics_are_logged_when_an_epoch_validates_and_evaluates(
    max_epochs, check_val, every, logged
):
    from jsonargparse import Namespace

    from sn_lightning._metrics import logged_metric_names

    attack = Namespace(
        class_path="sn_lightning.attacks.PGD", init_args=Namespace(norm="linf", eps=0.1, steps=5)
    )
    config = Namespace(
        trainer=Namespace(max_epochs=max_epochs, check_val_every_n_epoch=check_val),
        robust_eval=Namespace(attacks=[attack], every_n_epochs=every),
        data=Namespace(val_size=0.1),
    )
    names = logged_metric_names(config)
    assert ("val/robust_acc/pgd5_linf_0.1" in names) is logged


BAD_OPTIONS = {
    "--model.beta=-1": "options after --: `--model.beta=-1`: run "
    "{'adversarial.attack.init_args.eps': 0.05, 'model.beta': 1.0, "
    "'robust_eval.every_n_epochs': 1, 'trainer.max_epochs': 3} is rejected before training: "
    "beta must be positive",
    "--trainer.max_epochz=1": "options after --: `--trainer.max_epochz=1` do not parse with run "
    "{'adversarial.attack.init_args.eps': 0.05, 'model.beta': 1.0, "
    "'robust_eval.every_n_epochs': 1, 'trainer.max_epochs': 3}: unknown config key "
    "trainer.max_epochz; did you mean trainer.max_epochs? keys under 'trainer': ",
    "--model.beta=abc": "options after --: `--model.beta=abc` do not parse with run ",
    "--adversarial.attack.epss=1": "options after --: `--adversarial.attack.epss=1` do not parse "
    "with run {'adversarial.attack.init_args.eps': 0.05, 'model.beta': 1.0, "
    "'robust_eval.every_n_epochs': 1, 'trainer.max_epochs': 3}: adversarial.attack: PGD has no "
    "option 'epss'; valid: norm, eps, eps_rel, steps,",
}


@pytest.mark.parametrize("option", sorted(BAD_OPTIONS))
def test_bad_options_after_dashdash_fail_before_any_run(monkeypatch, tmp_path, capsys, option):
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    for dry_run in ([], ["--dry-run"]):
        out = tmp_path / "out"
        assert sweep.main(["run", str(DIGITS), "--out", str(out), *dry_run, "--", option]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"python -m sn_lightning.sweep: error: {BAD_OPTIONS[option]}"), line
        assert fake.calls == [] and not out.exists()  # no folder, no runs.csv, no JSON files


# -- the digits sweep end to end ---------------------------------------------------------------------
def _check_digits_runs(out, runs, n):
    cfg = sweep.load_sweep(DIGITS)
    metric = cfg["metric"]["name"]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == len(runs) == n
    expected = sweep.propose(sweep.sweep_config(cfg), [], n=n)
    for row, run, params in zip(rows, runs, expected, strict=True):
        assert row["status"] == "finished" and run.params == params
        results_file = Path(row["results"])
        assert results_file.parent == out / run.run_id / "sn-lightning" / run.run_id
        assert (results_file.parent / "config.yaml").is_file()
        results = json.loads(results_file.read_text())
        assert results["settings"]["model"]["beta"] == params["model.beta"]
        attack = results["settings"]["adversarial"]["attack"]["init_args"]
        assert attack["eps"] == params["adversarial.attack.init_args.eps"]
        value = results["metrics"][metric]
        assert 0.0 <= value <= 1.0 and float(row[metric]) == pytest.approx(value)
        assert float(row["test_acc"]) == pytest.approx(results["test"]["acc"])
        # the offline W&B run: the swept values in its config, the metric and results in its summary
        wandb_file = offline_run(out / run.run_id, run.run_id)
        assert {k: wandb_run_config(wandb_file)[k] for k in params} == run.used  # used values
        summary = wandb_summary(wandb_file)
        assert summary[metric] == pytest.approx(value)
        assert summary["results/test/acc"] == pytest.approx(results["test"]["acc"])
    for name in ("metric_vs_model.beta.png", "metric_vs_adversarial.attack.init_args.eps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_sweep_end_to_end_in_process(monkeypatch, tmp_path):
    """The runner with each run's exact fit arguments and environment, in this process (fast)."""

    def in_process(argv, env, log):
        assert argv[:4] == ["/usr/bin/env", "python", "-m", "sn_lightning.fit"]
        with monkeypatch.context() as m:
            for name in (
                "WANDB_RUN_ID",
                "WANDB_MODE",
                "WANDB_DIR",
                "WANDB_SWEEP_PARAM_PATH",
                "WANDB_PROJECT",
            ):
                m.setenv(name, env[name])
            try:
                fit_main(sweep.fit_args(argv))
            except SystemExit as err:
                return int(err.code or 0)
            finally:
                wandb.teardown()  # as wandb's in-process agent does: the next run reads its env
        return 0

    monkeypatch.setattr(sweep, "_execute", in_process)
    out = tmp_path / "digits"
    runs = sweep.run_sweep(DIGITS, count=2, out=out, fit_overrides=TINY)
    _check_digits_runs(out, runs, 2)
    assert [r.params["model.beta"] for r in runs] == [1.0, 2.0]


@pytest.mark.slow
def test_digits_sweep_end_to_end_real_processes(tmp_path):
    out = tmp_path / "digits"
    code = sweep.main(["run", str(DIGITS), "--count", "3", "--out", str(out), "--", *TINY])
    assert code == 0
    runs = sweep.read_csv(out / "runs.csv", sweep.load_sweep(DIGITS)["metric"]["name"])
    _check_digits_runs(out, runs, 3)
    assert [r.params["model.beta"] for r in runs] == [1.0, 2.0, None]  # None: no SN


def test_random_search_proposes_from_the_distributions(tmp_path, capsys):
    cfg = sweep.load_sweep(BAYES)
    cfg["method"] = "random"
    cfg.pop("early_terminate")
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = sweep.run_sweep(path, count=3, out=tmp_path / "out", dry_run=True)  # validates first
    assert len({r.params["model.beta"] for r in runs}) == 3
    for run in runs:
        assert 0.8 <= run.params["model.beta"] <= 8.0 and 0.003 <= run.params["model.lr"] <= 0.03
        assert type(run.params["model.beta"]) is float  # plain values, as from the W&B server
        configs = [run.command[i + 1] for i, a in enumerate(run.command) if a == "--config"]
        assert json.loads(configs[-1]) == run.params  # inline: a dry run writes no JSON file


def _imagefolder_sweep(tmp_path, data_dir, parameters):
    """The digits sweep on an imagefolder dataset at ``data_dir``, sweeping ``parameters``."""

    def edit(cfg):
        at = cfg["command"].index("configs/quickstart.yaml") + 1
        options = ["--data.dataset=imagefolder", f"--data.data_dir={data_dir}"]
        cfg["command"][at:at] = [*options, "--data.image_size=8"]
        cfg["parameters"] = parameters

    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(_digits_variant(edit)))
    return path


def _write_imagefolder(root, classes=("a", "b")):
    from PIL import Image

    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")


def test_data_missing_here_is_a_note_for_validate_and_dry_run_an_error_for_run(
    monkeypatch, tmp_path, capsys
):
    """An imagefolder sweep checked on a machine without its data (a laptop before the cloud)."""
    missing = tmp_path / "not-here"
    path = _imagefolder_sweep(tmp_path, missing, {"model.beta": {"values": [1.0, 2.0]}})
    note = (
        f"{path}: note: the data is not on this machine (imagefolder data_dir {missing} has no "
        "train/ class folder); every value was checked without it (2 classes stood in for the "
        "class folders of train/), but not the files themselves"
    )
    assert sweep.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: ok (grid, 2 runs")
    assert out[1:] == [note]
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    assert sweep.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert note in capsys.readouterr().out.splitlines()
    # a real run needs the data: it stops before starting anything
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{sweep.PROG}: error: {path}: run {{'model.beta': 1.0}} cannot start: imagefolder "
        f"data_dir {missing} has no train/ class folder"
    ]
    assert fake.calls == [] and not (tmp_path / "o").exists()
    # without the data, the model's values and the data module's later checks still run
    path = _imagefolder_sweep(tmp_path, missing, {"model.beta": {"values": [1.0, -1.0]}})
    (error,) = sweep.validate_sweep(path, [])
    assert "parameters.model.beta: value -1.0 is rejected before training: beta" in error
    path = _imagefolder_sweep(tmp_path, missing, {"data.std": {"values": [[0.5] * 3, [0.0] * 3]}})
    assert sweep.validate_sweep(path, []) == [
        f"{path}: parameters.data.std: value [0.0, 0.0, 0.0] is rejected before training: mean "
        "must be finite and std positive and finite, got [0.485, 0.456, 0.406] and [0.0, 0.0, 0.0]"
    ]
    path = _imagefolder_sweep(tmp_path, missing, {"data.batch_size": {"values": [4, 0]}})
    assert sweep.validate_sweep(path, []) == [
        f"{path}: parameters.data.batch_size: value 0 is rejected before training: "
        "batch_size must be a positive integer, got 0"
    ]
    path = _imagefolder_sweep(tmp_path, missing, {"data.image_size": {"values": [8, 0]}})
    assert sweep.validate_sweep(path, []) == [
        f"{path}: parameters.data.image_size: value 0 is rejected before training: "
        "dataset 'imagefolder' needs --data.image_size > 0, got 0"
    ]
    # train/ here but test/ missing: the class count is known, nothing stands in
    for name in ("a", "b", "c"):
        (missing / "train" / name).mkdir(parents=True)
    notes = []
    path = _imagefolder_sweep(tmp_path, missing, {"model.beta": {"values": [1.0, 2.0]}})
    assert sweep.validate_sweep(path, notes) == []
    assert notes == [
        f"the data is not on this machine (imagefolder data_dir {missing} has no test/ class "
        "folder); every value was checked without it, but not the files themselves"
    ]
    # with the data here, nothing is noted and the model's values are checked as before
    _write_imagefolder(tmp_path / "here")
    path = _imagefolder_sweep(tmp_path, tmp_path / "here", {"model.beta": {"values": [1.0, -1.0]}})
    notes = []
    (error,) = sweep.validate_sweep(path, notes)
    assert "parameters.model.beta: value -1.0 is rejected before training: beta" in error
    assert notes == []
    # the options after -- may point at the data: a real run then starts
    path = _imagefolder_sweep(tmp_path, missing, {"model.beta": {"values": [1.0]}})
    here = f"--data.data_dir={tmp_path / 'here'}"
    assert sweep.main(["run", str(path), "--dry-run", "--", here]) == 0
    assert not any("note:" in line for line in capsys.readouterr().out.splitlines())
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o"), "--", here]) == 0
    assert len(fake.calls) == 1 and fake.calls[0][0][-1] == here


def _cifar_sweep(tmp_path, options, parameters, name="cifar.yaml"):
    """The digits sweep on CIFAR-10 with the fit ``options``, sweeping ``parameters``."""

    def edit(cfg):
        at = cfg["command"].index("configs/quickstart.yaml") + 1
        cfg["command"][at:at] = ["--data.dataset=cifar10", *options]
        cfg["parameters"] = parameters

    path = tmp_path / name
    path.write_text(yaml.safe_dump(_digits_variant(edit)))
    return path


def test_missing_torchvision_files_without_download_stop_a_run_and_with_download_do_not(
    monkeypatch, tmp_path, capsys
):
    """CIFAR-10 with download=false and no files: each run would fail, so `run` starts none."""
    missing = tmp_path / "no-cifar"
    reason = (
        f"data folder {missing} for dataset 'cifar10' does not exist; set --data.data_dir to the "
        "folder holding the files or pass --data.download=true"
    )
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    beta = {"model.beta": {"values": [1.0, 2.0]}}
    path = _cifar_sweep(tmp_path, [f"--data.data_dir={missing}"], beta)
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{sweep.PROG}: error: {path}: run {{'model.beta': 1.0}} cannot start: {reason}"
    ]
    assert fake.calls == [] and not (tmp_path / "o").exists()
    notes = []
    assert sweep.validate_sweep(path, notes) == []
    assert notes == [
        f"the data is not on this machine ({reason}); every value was checked without it, but "
        "not the files themselves"
    ]
    # the model's values are checked without the files; run names both problems at once
    path = _cifar_sweep(tmp_path, [f"--data.data_dir={missing}"], {"model.beta": {"values": [-1]}})
    (error,) = sweep.validate_sweep(path, [])
    assert "parameters.model.beta: value -1 is rejected before training: beta" in error
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{sweep.PROG}: error: {error}",
        f"{sweep.PROG}: error: {path}: run {{'model.beta': -1}} cannot start: {reason}",
    ]
    # with download=true (in the command, or after --) the runs fetch the files: no objection
    path = _cifar_sweep(tmp_path, [f"--data.data_dir={missing}", "--data.download=true"], beta)
    notes = []
    assert sweep.validate_sweep(path, notes) == [] and notes == []
    path = _cifar_sweep(tmp_path, [f"--data.data_dir={missing}"], beta)
    assert sweep.main(["run", str(path), "--dry-run", "--", "--data.download=true"]) == 0
    assert not any("note:" in line for line in capsys.readouterr().out.splitlines())
    argv = ["run", str(path), "--out", str(tmp_path / "o"), "--", "--data.download=true"]
    assert sweep.main(argv) == 0
    assert len(fake.calls) == 2 and not missing.exists()  # nothing downloaded here
    assert all(argv[-1] == "--data.download=true" for argv, _ in fake.calls)
    # only the runs that lack their data count: download swept, the false half is named
    fake.calls.clear()
    path = _cifar_sweep(
        tmp_path,
        [f"--data.data_dir={missing}"],
        {"data.download": {"values": [True, False]}, "model.beta": {"values": [1.0, 2.0]}},
    )
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{sweep.PROG}: error: {path}: run {{'data.download': False, 'model.beta': 1.0}} cannot "
        f"start: {reason}"
    ]
    assert fake.calls == []


def test_data_values_split_across_parameters_are_checked_together(monkeypatch, tmp_path, capsys):
    """data.dataset and data.data_dir as two parameters: only whole runs say where the data is."""
    from tests.data.fixtures import make_cifar

    make_cifar(tmp_path / "cifar")
    parameters = {
        "data.dataset": {"values": ["cifar10"]},
        "data.data_dir": {"value": str(tmp_path / "cifar")},
    }
    path = _cifar_sweep(tmp_path, [], parameters)
    notes = []
    assert sweep.validate_sweep(path, notes) == [] and notes == []
    fake = _FakeFit("x")
    monkeypatch.setattr(sweep, "_execute", fake)
    assert sweep.main(["run", str(path), "--out", str(tmp_path / "o")]) == 0
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["run", "configs/sweeps/x.yaml", "--count", "abc"],
            "python -m sn_lightning.sweep run: error: argument --count: invalid int value: 'abc'; "
            "see python -m sn_lightning.sweep run --help",
        ),
        (
            ["frob"],
            "python -m sn_lightning.sweep: error: argument command: invalid choice: 'frob' "
            "(choose from 'validate', 'run'); see python -m sn_lightning.sweep --help",
        ),
    ],
)
def test_a_usage_error_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == message
