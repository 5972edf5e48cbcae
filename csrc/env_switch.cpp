// The C++ reading of an ELECTRA_FAST_NO_* switch, for the tests that hold electra_fast/_cpu.py's switch() to it.
#include <torch/library.h>

#include <string>

#include "env_switch.h"

namespace electra_fast {

TORCH_LIBRARY_FRAGMENT(electra_fast_cpp, m) {
  m.def("env_switch(str name) -> bool", [](std::string name) { return env_switch(name.c_str()); });
}

}  // namespace electra_fast
