"""Analysis: chat analytics, transcript emotion scoring, signal fusion and highlight detection.

Pure, synchronous, numpy-based code with no knowledge of jobs or the event loop; the stages in
klipstream/stages/ run it in threads and handle artifacts.
"""
