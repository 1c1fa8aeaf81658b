"""A run resumed from a mid-epoch checkpoint sees exactly the batches of the uninterrupted run."""
import hashlib

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bengali_empathy.data import EmpatheticDialogueDataModule
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM, GenerationSettings


class BatchRecorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        self.seen.append((trainer.global_step, digest))


def _short_corpus(tmp_path):
    """Short Q&A rows: the batches' order is what is checked, and short rows make each step cheap."""
    path = tmp_path / "qa.csv"
    rows = [f"প্রশ্ন {i}: আজ মন ভালো নেই।,আমি শুনছি; বলুন {i}।" for i in range(24)]
    path.write_text("prompt,response\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def _fit(tmp_path, tiny_model_path, callbacks, max_steps, ckpt_path=None):
    dm = EmpatheticDialogueDataModule(corpus_path=_short_corpus(tmp_path), max_seq_length=768, batch_size=2)
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", save_adapter_on_fit_end=False,
                   memory=MemorySettings(load_in_4bit=False, gradient_checkpointing=False),
                   generation=GenerationSettings(val_batches=0))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_train_batches=4, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(lm, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_mid_epoch_resume_continues_with_the_same_batches(tmp_path, tiny_model_path):
    full = BatchRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _fit(tmp_path, tiny_model_path, [full, ckpt], max_steps=11)
    assert len(full.seen) == 11
    assert len({d for _, d in full.seen[:4]} & {d for _, d in full.seen[4:8]}) < 4  # epochs are reshuffled
    (mid,) = [p for p in (tmp_path / "ckpt").glob("*.ckpt") if "step=6" in p.name]  # epoch 1, batch 2 of 4
    resumed = BatchRecorder()
    _fit(tmp_path, tiny_model_path, [resumed], max_steps=11, ckpt_path=str(mid))
    assert resumed.seen == full.seen[6:]
