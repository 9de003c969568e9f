"""SGLang glue for dflash_sglang: the plugin entry point, the drafter on SGLang layers, the spec-v2 worker.

Importing this package imports nothing from SGLang; `plugin.register` is the entry point and loads the rest
lazily, only in the process that builds the DFLASH worker.
"""
