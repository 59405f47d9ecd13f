/* Copyright (c) 2025, megasyne authors.
 *
 * The one pybind11 module of csrc/: megasyne._csrc. setup.py compiles every .cpp
 * file of csrc/ into it at install time (never at import); each builder file
 * registers its functions here.
 */
#include "index_builders.h"

PYBIND11_MODULE(_csrc, m) {
  m.doc() = "megasyne C++ builders for the mixture + curriculum sample index";
  m.attr("INDEX_ALGO_VERSION") = megasyne::kIndexAlgoVersion;
  megasyne::register_blend(m);
  megasyne::register_sample_index(m);
}
