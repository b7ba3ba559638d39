"""The source engines (migrate): image and live memory, the background stream, requests."""
