"""gradad.runtime"""
