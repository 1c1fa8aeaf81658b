"""``python -m bengali_empathy data-stats``: per-split corpus statistics for a fit config's ``data`` section."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError


def main(argv: list[str]) -> int:
    """Print per-split corpus statistics for a config's ``data`` section (no model is loaded)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from ..data import EmpatheticDialogueDataModule, format_stats
    from ..models.modeling import PACKAGED_MODELS, TINY_MODEL, tokenizer_path_for

    p = ArgumentParser(prog="python -m bengali_empathy data-stats",
                       description="Rows, conversations, turns, token-length percentiles, % over max_seq_length, "
                                   "reply tokens, and tokens per word and per character of the turns' texts alone "
                                   "(the chat template's own tokens not counted) per split, for the data section of "
                                   "a fit config.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(EmpatheticDialogueDataModule, "data")
    # The rest of a fit config is accepted and ignored, except the model path that selects the tokenizer.
    p.add_argument("--model", type=dict, default={})
    p.add_argument("--trainer", type=dict, default={})
    p.add_argument("--seed_everything", type=Optional[int], default=None)
    p.add_argument("--tokenizer", type=Optional[str], default=None,
                   help="count with this tokenizer instead of the model's, to compare base models on the corpus: "
                        f"a checkpoint or tokenizer directory, a .gguf file, {TINY_MODEL} or "
                        f"{', '.join(PACKAGED_MODELS)}")
    p.add_argument("--json", type=Optional[str], default=None, help="also write the statistics to this JSON file")
    cfg = p.parse_args(argv)
    model = cfg.model or {}
    if cfg.tokenizer is not None:
        cfg.data.tokenizer_path = tokenizer_path_for(cfg.tokenizer)
        if cfg.data.tokenizer_path is not None and not Path(cfg.data.tokenizer_path).is_dir():
            raise UserError(f"--tokenizer {cfg.tokenizer} is not a checkpoint or tokenizer directory, a .gguf file, "
                            f"{TINY_MODEL} or {', '.join(PACKAGED_MODELS)}")
    elif cfg.data.tokenizer_path is None:
        cfg.data.tokenizer_path = tokenizer_path_for(model.get("model_name_or_path", TINY_MODEL))
    cfg.data.objective = (model.get("objective") or {}).get("name", "sft")  # linked in fit: the layout follows it
    counted_not_raised = cfg.data.encoding.on_too_long == "error"
    if counted_not_raised:  # count every too-long row instead of stopping at the first
        cfg.data.encoding.on_too_long = "drop"
    dm = p.instantiate_classes(cfg).data
    stats = dm.compute_stats()
    print(format_stats(stats, dm.hparams.max_seq_length))
    if counted_not_raised and any(s["dropped_too_long"] for s in stats.values()):
        print("note: on_too_long=error, so fit would stop at the first of the dropped_too_long rows; "
              "set data.encoding.on_too_long to drop, truncate or truncate_history")
    if cfg.json:
        import json

        from .._io import atomic_write_text

        atomic_write_text(Path(cfg.json), json.dumps(stats, indent=2) + "\n")
    return 0
