import subprocess
import sys

import sdk


def test_import_sdk_stays_light():
    code = (
        "import sys, sdk, sdk.preprocess, sdk.errors, sdk.ops; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers', 'onnx') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import sdk pulled in heavy modules: {out.stdout.strip()}"


def test_version_is_a_release_string():
    parts = sdk.__version__.split(".")
    assert len(parts) >= 3 and all(p.isdigit() for p in parts[:3])


def test_error_hierarchy():
    from sdk.errors import BackendUnavailableError, EngineError, InvalidInputError, SdkError

    for cls in (InvalidInputError, EngineError, BackendUnavailableError):
        assert issubclass(cls, SdkError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(BackendUnavailableError, ImportError)
