"""Training: the LightningModule, preference objectives, callbacks."""
