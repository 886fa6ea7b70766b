"""Native (C++/CUDA) operators: the fused ROIAlign + blend op (cpp_plugins/roi_blend)."""
