"""The output behind one interface (local or object store), its locks, and filesystems by URI."""
