# A oneDNN 2.x package whose config needs a dependency that is not installed, as Debian's does without OpenCL.
find_package(XaxMissingOneDnnDependency REQUIRED)
