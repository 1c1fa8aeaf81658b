"""``python -m bengali_empathy {fit,validate,test,predict,chat,export,benchmark,...} ...``"""
import sys

# Unsloth patches transformers/peft when imported, so it must come first when it may be used.
from bengali_empathy.models.backends import preimport_unsloth

preimport_unsloth(sys.argv[1] if len(sys.argv) > 1 else None)

from bengali_empathy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
