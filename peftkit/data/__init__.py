"""Data: read sources, normalise row formats, render chats, build loss masks, audit, batch."""
