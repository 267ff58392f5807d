<?php
namespace App\Controller;

use App\Lib\Greeting;

final class HomeController
{
    public function index(): string
    {
        return Greeting::line() . PHP_EOL;
    }
}
