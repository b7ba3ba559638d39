"""The source engines (migrate).

- :mod:`.pages`: PageBook, the one owner of what is to send and what was sent;
- :mod:`.bandwidth`: the one --max-bandwidth cap;
- :mod:`.streamer`: PageStreamer (background stream, sections, EOF, SHUT) and Lane;
- :mod:`.requests`: RequestServer, the native server answering requests on the preempt channel;
- :mod:`.image`: ImageMemory and migrate_image (lazy restore from a file);
- :mod:`.attached`, :mod:`.live`: the attached program, and its live migration.
"""
