"""The stages, in flow order: prompts -> assign -> generate -> judge -> constraints -> pairs.

Each is a plain function from records to records; none calls a model or imports an executor."""
