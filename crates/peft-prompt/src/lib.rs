//! peft-prompt: part of the peft workspace; its methods are not implemented yet (see the README method table).
