message(FATAL_ERROR "xax must not load a oneDNN 3 package: its backend uses the 2.x API")
