"""`make demo`: the main job end to end on local defaults, with the committed demo pair."""
