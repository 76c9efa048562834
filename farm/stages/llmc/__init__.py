"""farm's replacements of llm-compressor, compressed-tensors and transformers internals, each scoped to one
oneshot or save and switchable. `registry.REPLACEMENTS` lists every one: what it replaces, the upstream versions
it was checked against, its switch and its equivalence test; `registry.check` guards the installed versions."""
