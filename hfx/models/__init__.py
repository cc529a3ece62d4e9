"""Model families: each folder is `configuration_<family>.py` + `modeling_<family>.py`, self-contained."""
