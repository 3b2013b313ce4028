"""(being written: issue 26)"""
