"""Export tests: transformers' caches (its remote-code module cache included) in a temporary
folder, and never the network."""

import os
import tempfile

# Before transformers is imported: its remote-code modules are copied under HF_HOME.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="fogjax-hf-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
