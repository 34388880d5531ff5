"""Helpers shared by the fixture scripts (make_fixtures.py, adapterhub_fixtures.py)."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable_configs(folder):
    """Rewrite the JSON and Markdown files under `folder` so that paths inside this checkout
    (the base model's name, recorded by AdapterHub and PEFT, and in PEFT's model card) are
    relative to the repository root: no machine path is committed."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if not name.endswith((".json", ".md")):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                text = f.read()
            portable = text.replace(json.dumps(ROOT + os.sep)[1:-1], "")
            if portable != text:
                with open(path, "w") as f:
                    f.write(portable)
