"""One module per command-line verb, named after it (``kernelatlas VERB`` is implemented in ``jobs/VERB.py``;
``import-filterdb`` / ``export-filterdb`` in ``jobs/filterdb.py``).  Each module is also the verb's Python API;
the package's lazy names (``kernelatlas.train``, ``.clusters``, ``.quality``, ``.shift``) point here."""
