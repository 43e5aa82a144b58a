# The `hexiao` command-line tools for installers and support engineers: a thin layer over
# the library.
