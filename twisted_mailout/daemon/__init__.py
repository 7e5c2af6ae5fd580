"""The daemon layer: the typed L{Config}, the twistd options and service, the C{mailout}
command and the embedded demo. The top layer: everything else is below it.
"""
