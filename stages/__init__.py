"""One module per pipeline stage; each exposes ``SPEC``, a :class:`clearrec.pipeline.stage.StageSpec`."""
