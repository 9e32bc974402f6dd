"""Resuming a killed run (issue 13): the penalty state travels with every checkpoint, and a run killed after a
checkpoint and resumed logs the same losses as one that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_trainer import config, lm_dataset, tiny_llama

from hf_collapse import CollapseTrainer
from hf_collapse.checkpoints import PENALTY_STATE_FILE, TEACHER_FILE, latest_checkpoint, resolve_resume

ROOT = Path(__file__).resolve().parents[1]

# A targeted run that exercises every piece of penalty state: kept directions and their generator, a target
# chosen by measurement at step 2, λ adapted every 3 steps against a reference loss, a fade, and distillation
# from the teacher copied at the choice. Each log goes to a JSON-lines file as soon as it is made.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from transformers import TrainerCallback
    from test_trainer import config, lm_dataset, tiny_llama
    from hf_collapse import CollapseTrainer

    out, logs, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                with open(sys.argv[2], "a") as f:
                    f.write(json.dumps({{"step": state.global_step, **logs}}) + "\\n")
                    f.flush()
                    os.fsync(f.fileno())

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    args = config(
        out, max_steps=10, learning_rate=5e-3, save_strategy="steps", save_steps=3, msw_weight=2.0,
        collapse_num_layers=1, target_choice="measured", target_choice_steps=2, target_choice_samples=8,
        msw_adaptive=True, msw_adapt_steps=3, fade_steps=7, distill_weight=0.5, msw_num_projections=4,
    )
    data = lm_dataset(32)
    trainer = CollapseTrainer(
        model=tiny_llama(layers=4), args=args, train_dataset=data, eval_dataset=data.select(range(8)),
        callbacks=[Record()],
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    print(json.dumps({{"targets": trainer.collapse_targets, "schedule": [e.to_dict() for e in trainer.msw_schedule]}}))
    """
)


def _run(tmp_path, out, logs, kill_at=-1, resume=False):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), str(out), str(logs), str(kill_at), "resume" if resume else "fresh"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )


def _logs(path):
    return {entry["step"]: entry for entry in map(json.loads, path.read_text().splitlines())}


def test_a_run_killed_after_a_checkpoint_resumes_on_the_same_loss_curve(tmp_path):
    whole = _run(tmp_path, tmp_path / "whole", tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _run(tmp_path, tmp_path / "cut", tmp_path / "cut.jsonl", kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-6"
    # the teacher copied at the target choice (step 2) is part of every later checkpoint
    assert (tmp_path / "cut" / "checkpoint-6" / TEACHER_FILE).is_file()
    resumed = _run(tmp_path, tmp_path / "cut", tmp_path / "resumed.jsonl", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    full, before, after = _logs(tmp_path / "whole.jsonl"), _logs(tmp_path / "cut.jsonl"), _logs(tmp_path / "resumed.jsonl")
    assert sorted(full) == list(range(1, 11)) and sorted(before) == list(range(1, 8)) and sorted(after) == list(range(7, 11))
    for step in range(7, 11):  # from the resume point on: the same losses and the same penalty values
        for key in ("loss", "msw/penalty", "msw/weight", "distill/loss", "fade/alpha"):
            assert after[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)
        for key in (k for k in full[step] if k.startswith("msw/layer_")):
            assert after[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-9), (step, key)
    # λ adapted at step 8, after the resume, against the reference loss taken at step 2 before the kill
    whole_summary, resumed_summary = json.loads(whole.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert [e["step"] for e in whole_summary["schedule"]] == [2, 5, 8]
    for summary in (whole_summary, resumed_summary):  # the choice's wall time is the one value that may differ
        assert summary["schedule"][0].pop("seconds") >= 0
    assert resumed_summary == whole_summary


def test_an_incomplete_checkpoint_is_skipped_and_none_is_refused_with_one_sentence(tmp_path):
    (tmp_path / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"half")  # killed while writing
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N folder.*incomplete: checkpoint-4"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    for name in ("trainer_state.json", PENALTY_STATE_FILE):
        (tmp_path / "checkpoint-2" / name).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert resolve_resume("latest", tmp_path).name == "checkpoint-2"
    assert resolve_resume(None, tmp_path) is None and resolve_resume("false", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="cannot resume from .*checkpoint-4: it has no trainer_state.json"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)


def test_resuming_with_other_penalty_settings_is_refused(tmp_path):
    data = lm_dataset(16)
    first = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, msw_weight=1.0),
        train_dataset=data,
    )
    first.train()
    state = json.loads((tmp_path / "checkpoint-2" / PENALTY_STATE_FILE).read_text())
    assert state["global_step"] == 2 and state["settings"]["msw_weight"] == 1.0
    again = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, msw_weight=3.0),
        train_dataset=data,
    )
    with pytest.raises(ValueError, match=r"penalty settings differ.*msw_weight: 1.0 -> 3.0"):
        again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 0


def test_checkpoints_never_hold_the_hub_token(tmp_path):
    token = "hf_PLANTEDtoken1234567890abcdef"
    trainer = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, hub_token=token),
        train_dataset=lm_dataset(8),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert trainer.args.hub_token == token  # still there for an upload the caller asks for
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)
    assert [p for p in files if token.encode() in p.read_bytes()] == []
