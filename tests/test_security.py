"""Manifests cannot run code: plugins come only from installed entry points, remote code is never enabled."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

import outlier_runtime
from outlier_runtime import ManifestError


@pytest.mark.parametrize("key, value", [
    ("cache_policy", "os:system"),
    ("reader", "subprocess.run"),
    ("loader", "builtins:eval"),
])
def test_import_paths_are_not_plugin_names(key, value):
    with pytest.raises(ManifestError) as error:
        outlier_runtime.load("plus", **{key: value}, force=True)
    assert value in str(error.value)


def test_remote_code_in_a_model_directory_is_never_run(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny("qwen3_moe"), model)
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((model / name).read_text())
        data["auto_map"] = {"AutoConfig": "evil.Config", "AutoTokenizer": ["evil.Tok", None],
                            "AutoModelForCausalLM": "evil.Model"}
        (model / name).write_text(json.dumps(data))
    for tier in ("nano", "plus"):
        try:
            runtime = outlier_runtime.load(tier, model=str(model), force=True)
            runtime.close()
        except Exception:  # refusing to load is fine too; running the code is not
            pass
        assert not marker.exists()
    assert "evil" not in sys.modules
