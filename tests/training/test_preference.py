"""DPO / KTO: the losses against hand computations and TRL, the reference model, and a short DPO run."""
import json
import math
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_cli

from bengali_empathy.training.preference import dpo_loss, kto_loss, labelled_metrics, pair_metrics

# Summed reply log-probabilities of three pairs: policy / reference, chosen / rejected.
POLICY_CHOSEN = torch.tensor([-12.0, -30.5, -7.25])
POLICY_REJECTED = torch.tensor([-14.0, -29.0, -9.5])
REF_CHOSEN = torch.tensor([-13.0, -30.0, -8.0])
REF_REJECTED = torch.tensor([-13.5, -29.5, -9.0])
BETA = 0.1


def test_dpo_loss_equals_a_hand_computation():
    loss, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)
    # pair 1: (-12 + 13) - (-14 + 13.5) = 1.5; pair 2: -0.5 - 0.5 = -1.0; pair 3: 0.75 - (-0.5) = 1.25
    by_hand = sum(math.log(1 + math.exp(-BETA * d)) for d in (1.5, -1.0, 1.25)) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, -0.05, 0.075])
    assert rejected.tolist() == pytest.approx([-0.05, 0.05, -0.05])
    m = pair_metrics(chosen, rejected)
    assert m["reward_accuracy"].item() == pytest.approx(2 / 3)
    assert m["reward_margin"].item() == pytest.approx((0.15 - 0.1 + 0.125) / 3)
    # the policy equal to its reference: every reward 0, loss log 2, a tie counted half
    loss, chosen, rejected = dpo_loss(REF_CHOSEN, REF_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)
    assert loss.item() == pytest.approx(math.log(2))
    assert pair_metrics(chosen, rejected)["reward_accuracy"].item() == 0.5


def test_dpo_loss_equals_trls():
    """TRL's DPOTrainer loss (sigmoid, reverse KL) on the same log-probabilities: its ``_compute_loss`` with a
    stand-in model that returns them per token (a reply's tokens sum to the numbers above)."""
    pytest.importorskip("trl")
    from trl import DPOTrainer

    n, width = len(POLICY_CHOSEN), 4
    mask = torch.zeros(2 * n, width + 1, dtype=torch.long)
    mask[:, 2:] = 1  # 3 reply tokens per row after a 2-token prompt
    per_token = torch.cat([POLICY_CHOSEN, POLICY_REJECTED]).unsqueeze(1).repeat(1, width) / 3
    per_token[:, 0] = 0.0  # position 0 predicts a prompt token: not summed by TRL's mask either
    shape = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                              is_top1=torch.zeros(shape, dtype=torch.bool))
    accel = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=["sigmoid"], loss_weights=[1.0], beta=BETA, use_weighting=False,
                              label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
                              _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * n, width + 1, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": REF_CHOSEN, "ref_rejected_logps": REF_REJECTED}
    # TRL masks the labels itself and reads per-token log-probs of every position; ours come summed
    trl_loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    ours, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)
    assert trl_loss.item() == pytest.approx(ours.item(), rel=1e-6)
    assert trainer._metrics["train"]["rewards/margins"][0] == pytest.approx((chosen - rejected).mean().item())


def test_kto_loss_equals_a_hand_computation():
    policy, reference = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-11.0, -19.0, -5.5])
    desirable = torch.tensor([True, False, True])
    loss, rewards = kto_loss(policy, reference, desirable, BETA, desirable_weight=1.0, undesirable_weight=2.0)
    ratios = [1.0, -1.0, 0.5]
    z = max(0.0, sum(ratios) / 3)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    values = [1 - sig(BETA * (1.0 - z)), 1 - sig(BETA * (z + 1.0)), 1 - sig(BETA * (0.5 - z))]
    assert loss.item() == pytest.approx((values[0] + 2 * values[1] + values[2]) / 4, rel=1e-6)
    m = labelled_metrics(rewards, desirable)
    assert m["reward_accuracy"].item() == 1.0  # both desirable rewards > 0, the undesirable one < 0
    assert m["reward_margin"].item() == pytest.approx(0.075 + 0.1)


def _batch(tokenizer):
    """A collated DPO batch of two pairs (short system prompt)."""
    from bengali_empathy.data import Collator

    from conftest import TWO_PAIRS, encode_pairs

    chosen = encode_pairs(tokenizer, TWO_PAIRS, system="সহমর্মী হোন।")
    rejected = encode_pairs(tokenizer, [(p, TWO_PAIRS[1 - i][1]) for i, (p, _) in enumerate(TWO_PAIRS)],
                            system="সহমর্মী হোন।")
    for c, r in zip(chosen, rejected):
        c.update(rejected_ids=r["input_ids"], rejected_spans=r["label_spans"], desirable=None)
    return Collator(tokenizer.pad_token_id)(chosen)


@pytest.mark.parametrize("start", ["base", "adapter"])
def test_reference_stays_fixed_while_the_policy_trains(tmp_path, tiny_lora, tokenizer, start):
    """From the base, the reference is the adapter switched off; from an adapter, a frozen second copy of it.
    Either way it equals the policy at the start and does not move while the policy trains."""
    import copy

    from bengali_empathy.training.preference import PreferenceObjective

    backend, shared, _ = tiny_lora
    model = copy.deepcopy(shared)  # trained here: the session's model stays as it is
    adapter = None
    if start == "adapter":  # the run starts from an "SFT" adapter (LoRA B off zero), loaded as fit loads it
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        adapter = tmp_path / "sft"
        model.save_pretrained(str(adapter))
    objective = PreferenceObjective("dpo", BETA, adapter_path=str(adapter) if adapter else None)
    batch = _batch(tokenizer)
    policy0, reference0 = objective.log_probs(backend, model, batch)
    assert torch.allclose(policy0, reference0)
    if start == "adapter":
        with torch.no_grad(), model.disable_adapter():
            base = backend.sequence_logps(model, batch)[0]
        assert not torch.allclose(reference0, base)  # the reference is the adapter, not the base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    assert not any("reference" in n for n, p in model.named_parameters() if p.requires_grad)
    for _ in range(2):
        loss, _ = objective.loss(backend, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    policy, reference = objective.log_probs(backend, model, batch)
    assert torch.equal(reference, reference0)
    assert not torch.allclose(policy, policy0)
    assert objective.loss(backend, model, batch)[0].item() < math.log(2)
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved), selected_adapters=[model.active_adapter])
    assert not (saved / "reference").exists()


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def dpo_fit(tmp_path_factory):
    """``fit --config configs/dpo.yaml`` on 32 pairs built from the bundled sample (a short system prompt,
    replies cut to fit 128 tokens: the mechanics, in tens of seconds; 3 batches an epoch)."""
    cwd = tmp_path_factory.mktemp("dpo")
    sample = ROOT / "bengali_empathy" / "resources" / "sample_dialogues.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_preference_pairs.py"), str(sample),
                    str(cwd / "all.jsonl")], check=True, capture_output=True)
    lines = (cwd / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (cwd / "prefs.jsonl").write_text("".join(lines[:32]), encoding="utf-8")
    r = run_cli(["fit", "--config", ROOT / "configs" / "dpo.yaml", "--data.system_prompt", "সহমর্মী হোন।",
                 "--data.max_seq_length", "128", "--data.encoding.on_too_long", "truncate",
                 "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "1"],
                cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, cwd / "lightning_logs" / "version_0"


def test_dpo_run_raises_reward_accuracy(dpo_fit):
    cwd, run_dir = dpo_fit
    s = _scalars(run_dir)
    accuracy, margin = s["train/reward_accuracy"], s["train/reward_margin"]
    assert accuracy[0] == 0.5  # step 1: the policy is its reference, every reward 0
    assert sum(accuracy[-4:]) / 4 >= 0.9 and min(margin[-4:]) > 0, (accuracy, margin)
    for tag in ("train/chosen_reward", "train/rejected_reward", "val/reward_accuracy", "val/reward_margin",
                "val/loss", "train/loss_step"):
        assert tag in s, tag
    final = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["final"]
    assert final["val/reward_accuracy"] == pytest.approx(s["val/reward_accuracy"][-1])
    import sqlite3

    with sqlite3.connect(cwd / "lightning_logs" / "experiments.db") as con:
        metrics = json.loads(con.execute("SELECT metrics FROM LLAMAExperiments").fetchone()[0])
    assert metrics["val/reward_margin"] == pytest.approx(s["val/reward_margin"][-1])
    assert metrics["train/reward_accuracy"] == pytest.approx(accuracy[-1])
    assert not (run_dir / "adapter" / "reference").exists()


def test_dpo_adapter_loads_like_any_other(dpo_fit):
    cwd, run_dir = dpo_fit
    r = run_cli(["chat", "--adapter", run_dir / "adapter", "-m", "আমি একা।", "--max-new-tokens", "4"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
    r = run_cli(["predict", "--config", ROOT / "configs" / "default.yaml", "--model.adapter_path", run_dir / "adapter",
                 "--data.predict.max_samples", "2", "--model.decoding.max_new_tokens", "2",
                 "--trainer.default_root_dir", cwd / "predict"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cwd / "predict" / "lightning_logs" / "version_0" / "predictions.jsonl").is_file()
    r = run_cli(["export", "--adapter", run_dir / "adapter", "--output", cwd / "merged"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cwd / "merged" / "config.json").is_file()


def test_report_shows_the_rewards(dpo_fit):
    cwd, run_dir = dpo_fit
    r = run_cli(["report", run_dir, "--output", cwd / "report"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (cwd / "report" / "REPORT.md").read_text(encoding="utf-8")
    assert "val/reward_accuracy" in text and "train/reward_margin" in text


@pytest.mark.parametrize("args, message", [
    (["--model.objective.dpo_beta", "0"], "error: model.objective.dpo_beta must be positive, not 0.0"),
    (["--data.pack", "true"], "error: data.pack packs dialogues and raw text; objective dpo compares whole replies"),
    (["--data.columns.text", "text"], "error: data.columns.text is raw text for objective sft, not dpo"),
    (["--model.objective.kto_undesirable_weight", "-1"],
     "error: model.objective.kto_undesirable_weight must be positive, not -1.0"),
])
def test_bad_preference_options_are_one_line(tmp_path, args, message):
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "জানি না।"}\n',
                                          encoding="utf-8")
    r = run_cli(["fit", "--config", ROOT / "configs" / "dpo.yaml", *args], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-1500:]


def test_validate_and_test_write_the_rewards(dpo_fit):
    cwd, run_dir = dpo_fit
    r = run_cli(["test", "--config", ROOT / "configs" / "dpo.yaml", "--model.adapter_path", run_dir / "adapter",
                 "--data.system_prompt", "সহমর্মী হোন।", "--data.max_seq_length", "128", "--data.encoding.on_too_long",
                 "truncate"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    test_dir = cwd / "lightning_logs" / "version_1"
    metrics = json.loads((test_dir / "metrics.json").read_text(encoding="utf-8"))
    s = _scalars(test_dir)
    assert metrics["reward_accuracy"] == pytest.approx(s["test/reward_accuracy"][-1])
    assert metrics["loss"] == pytest.approx(s["test/loss"][-1]) and metrics["n"] == 4  # the 4 test pairs
    import sqlite3

    with sqlite3.connect(cwd / "lightning_logs" / "experiments.db") as con:
        row = json.loads(con.execute("SELECT metrics FROM LLAMAExperiments ORDER BY id DESC").fetchone()[0])
    assert row["reward_margin"] == pytest.approx(metrics["reward_margin"])


def test_predict_refuses_a_preference_objective(dpo_fit):
    cwd, run_dir = dpo_fit
    r = run_cli(["predict", "--config", ROOT / "configs" / "dpo.yaml", "--model.adapter_path", run_dir / "adapter",
                 "--registry.db_path", "null"], cwd=cwd)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: predict generates replies to conversations")
