import os

# Tests build every component in code; never reach out to the Hugging Face Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
