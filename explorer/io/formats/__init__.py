"""Checkpoint formats, one small module each, behind the ``Checkpoint`` interface of ``base``.

safetensors_dir  config.json + model.safetensors, or shards + model.safetensors.index.json
bin              config.json + pytorch_model.bin, or shards + pytorch_model.bin.index.json (weights_only)
gguf_file        a llama.cpp .gguf file, dequantized per tensor, HF tensor names
lora             a PEFT LoRA adapter folder folded into its base model
trainer          Trainer run folders (checkpoint-STEP/ + trainer_state.json): steps and losses
hf_cache         the hub cache layout (models--ORG--NAME/snapshots/<commit>, refs/main)
refs             how a recipe names an input (path, repo id, BASE+ADAPTER); no model library imported
safetensors_io   plain reads and streaming writes of .safetensors files (no memory map)
quantized        a checkpoint with a quantization_config: block FP8 dequantized on read, other schemes refused

``explorer.io.checkpoint`` detects which one a path is and opens it.
"""
