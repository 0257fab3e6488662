"""gradad.export"""
