"""What a run leaves behind: the streamed writer, run facts, the dataset card, mixtures, hub."""
