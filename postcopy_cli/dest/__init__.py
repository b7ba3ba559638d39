"""The destination engine (serve-dest): phases, channels, placement, the attached program."""
