# Two commands for a fresh machine (Python 3.10+ with venv; Debian/Ubuntu for the microphone test):
#   make demo   - set up .venv, export the tiny preset if missing, run the runtime on the built-in sample clip
#   make test   - set up .venv (with the test extras and the audio server packages) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q

.PHONY: demo test setup setup-test system-packages clean optimum-env

# facenet-pytorch only for its MTCNN weights (the export turns them into ONNX): --no-deps, because its
# declared pins (torch<2.3, numpy<2, torchvision) would replace this project's torch and numpy.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==2.13.0"
	@echo "installing the runtime and the exporter; llama-cpp-python compiles for about 4 minutes on 2 cores"
	$(PY) -m pip install --progress-bar on -e ".[export]"
	$(PIP) install --no-deps "facenet-pytorch==2.6.0"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[export,test,mic,asr,eval,lsl]"
	touch $@

# Hugging Face optimum (docs/optimum.md) in a folder of its own: optimum-onnx 0.1.0 needs transformers<4.58 (and so
# huggingface_hub<1.0, tokenizers<=0.23.0), the reference runs on transformers 5.x; optimum's code runs in a
# subprocess with this folder first on PYTHONPATH, taking torch, onnx and onnxruntime from the venv. --no-deps:
# nothing else is replaced; one small binary wheel (tokenizers), the rest pure Python, a few seconds.
OPTIMUM_ENV  := .optimum-env
OPTIMUM_PINS := "transformers==4.57.6" "optimum==2.3.0" "optimum-onnx==0.1.0" "huggingface_hub>=0.34,<1.0" \
                "tokenizers>=0.22,<=0.23.0"
$(OPTIMUM_ENV)/.installed: $(VENV)/.installed
	rm -rf $(OPTIMUM_ENV)
	$(PIP) install --no-deps --target $(OPTIMUM_ENV) $(OPTIMUM_PINS)
	touch $@

optimum-env: $(OPTIMUM_ENV)/.installed

setup: $(VENV)/.installed

setup-test: system-packages $(VENV)/.installed-test $(OPTIMUM_ENV)/.installed

# PortAudio headers for PyAudio, PulseAudio with a virtual microphone for the microphone test, espeak-ng for
# real speech in the speech-recognition tests, ffmpeg for a network camera on loopback (lost and back).
system-packages:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  if ! dpkg -s pulseaudio portaudio19-dev libasound2-plugins pulseaudio-utils espeak-ng ffmpeg >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      pulseaudio pulseaudio-utils portaudio19-dev libasound2-plugins espeak-ng ffmpeg >/dev/null; fi; \
	else echo "not root or no apt-get: install pulseaudio, pulseaudio-utils, portaudio19-dev, espeak-ng, ffmpeg yourself"; fi

demo: setup
	$(VENV)/bin/edge-emollama demo

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(OPTIMUM_ENV) artifacts *.egg-info
