"""``python -m bengali_empathy {fit,validate,test,predict,chat,export,benchmark} ...``"""
import sys

# Unsloth patches transformers/peft when imported, so it must come first when it
# will be used (CUDA + the optional extra + backend auto/unsloth).
from bengali_empathy.backends import preimport_unsloth

preimport_unsloth(sys.argv[1:])

from bengali_empathy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
