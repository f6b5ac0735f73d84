"""The tar code both sides share, blocking and free of gRPC: the reader
(_read), the writer (_write), the entry rules (_rules) and exact mtimes
(_paxtime). The rules decide and raise neutral errors; each side maps them
to its own."""
