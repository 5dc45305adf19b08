"""Hugging Face interoperability: export a run (or any params) to a transformers checkpoint
directory, and read one back as fogjax params.

    python -m fogjax.export --workdir=runs/fog-1.5b --output=hf/fog-1.5b     # the command line
    export_run(workdir, output)          # writer.py: config.json, safetensors, tokenizer, code
    read_params(directory, config, abstract_params)   # hf_import.py (train.init_from)

Modules: ``hf_config`` (which HF class, config.json), ``mapping`` (the shared weight mapping
and its conversions), ``family_llama`` / ``family_olmo2`` / ``family_fog`` (per-family block
mappings), ``layout`` (scanned tree <-> per-block dicts), ``safetensors_io`` (sharded files),
``tokenizer_files``, ``remote_code`` (remote/configuration_fog.py, remote/modeling_fog.py),
``writer``, ``hf_import``. Needs requirements-export.txt (transformers, safetensors; no torch),
imported only when used: nothing else in fogjax imports this package except the trainer's
``train.init_from``, which imports :mod:`fogjax.export.hf_import` only when it is set.
"""
