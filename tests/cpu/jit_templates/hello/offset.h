#pragma once
constexpr int kExtra = 0;
