// SPDX-License-Identifier: GPL-2.0
/* The CO-RE engine's object without its walk_port program, under another
 * name: what an object built before walk_port existed looks like to the
 * engine, which must fall back to the iterators and say so (test_walk.py). */
#define walk_port walk_port_absent
#include "../../bpf/core.bpf.c"
